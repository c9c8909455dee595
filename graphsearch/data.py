"""Image-classification data for `graphsearch optimize`.

`load_dataset(spec)` turns what the user names into a :class:`DataBundle` with three roles:

- ``train``: what weights are fitted on;
- ``val`` (validation): what every decision is made on (defaults, tuning, ranking of
  candidates, early stopping); held out of `spec` by the seed (stratified per class), or all
  of `val_data` when the user names validation data of their own;
- ``test``: reported only, measured once at the end; held out of `spec` by the seed
  (`test_fraction`, stratified, chosen before and independently of the validation split),
  or all of `test_data`. Search methods never receive it: they get
  :meth:`DataBundle.for_search`, a :class:`SearchData` that has no ``test`` at all.

plus the class names, the input shape, and a record of the preprocessing applied. Sources
(the same for `spec`, `val_data` and `test_data`):

- ``None``, ``"synthetic"``, ``"synthetic:N"`` or ``"synthetic:N:K"``: a built-in synthetic
  set (default 5,000 images of 10 classes, 32x32 RGB) generated deterministically from the
  seed. Each class combines an oriented grating, a colour and a blob position, with noise,
  random phase, contrast and shifts on top, so a small CNN learns it within an epoch or two
  but cannot read the label off one pixel. No files are needed, which makes it the data of
  tests and smoke runs. ``"synthetic:N:K:L"`` makes each class the union of L/K unrelated
  looks (L > K): a harder task, on which a pruned network's loss of capacity shows (the
  demo's data).
- an ImageFolder layout (``root/<class>/<image>``), given as a folder, a ``.zip`` or a
  ``.tar[.gz]``. Class folders may sit under one top-level folder (``train/airplane/1.png``,
  as in the project's CIFAR-10 zip); when the top level holds split folders (``train/``,
  ``test/``, ...) the ``train`` one is used.
- CIFAR-10/100 python pickles (``data_batch_1..5`` + ``batches.meta``, or ``train`` +
  ``meta``), as a folder or as the original ``cifar-10-python.tar.gz``.

Every image is decoded once into one uint8 tensor of shape (N, C, H, W). For files and
folders that tensor is cached under ``~/.cache/graphsearch/datasets`` (or ``$GRAPHSEARCH_CACHE``,
or ``cache_dir``) keyed by the source's path, size and modification time, so later runs skip
the decoding (for the 50,000-image CIFAR-10 zip: seconds instead of a fraction of a second).

Batches come out normalised with the training split's per-channel mean and std. The training
split is augmented the standard way for small images (random crop after zero padding of
size/8 pixels, i.e. 4 for 32x32, and a horizontal flip); the validation split never is.
Augmentation works on whole uint8 batches with one gather (see
:meth:`ImageTensorDataset.get_batch`, the fast path `graphsearch.train` uses), or per item
through ``dataset[i]`` for any ordinary DataLoader.

Problems with the input raise :class:`graphsearch.load.UserError` with a message that says what
is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import tarfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import checkpoint
from .load import UserError

__all__ = [
    "DataBundle",
    "SearchData",
    "ImageTensorDataset",
    "RawImages",
    "load_dataset",
    "load_images",
    "split_indices",
    "split_roles",
    "UserDataset",
    "user_datasets",
    "attach_hooks",
    "synthetic_images",
    "default_cache_dir",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")
SPLIT_FOLDER_NAMES = {"train", "training", "test", "testing", "val", "valid", "validation"}
SYNTHETIC_DEFAULT_IMAGES = 5000
SYNTHETIC_DEFAULT_CLASSES = 10
# Bump when the cached content changes meaning (decoding, resizing, layout detection).
CACHE_VERSION = 2
# Decoded data above this size is memory-mapped from the decode cache by default (`mapped`):
# never held in the search's memory, never shipped to workers (they map the same file).
MAP_ABOVE_BYTES = 2 * 2 ** 30
MEAN_STD_SAMPLE = 50_000  # mapped data: mean and std from this many training images at most


# --------------------------------------------------------------------------------------------
# Public containers


@dataclass
class RawImages:
    """Decoded images of one source, before splitting and normalisation."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    class_names: list[str]
    source: str  # what was read, for messages and the preprocessing record
    format: str  # "synthetic", "imagefolder", "cifar"
    notes: list[str] = field(default_factory=list)
    mapped: MappedFile | None = None  # `images` maps this file (see `MappedFile`)


_MAPS: dict = {}  # (path, shape) -> this process's mapping of a MappedFile


@dataclass(frozen=True)
class MappedFile:
    """Decoded uint8 images (N, C, H, W) in a raw file, row after row, that the search and
    its workers memory-map: the operating system reads the pages a batch touches (shared
    between the processes of a machine), nobody holds or ships a copy. On several machines
    the file must be on a file system they all see (`--shared-data DIR`)."""

    path: str
    shape: tuple

    def open(self) -> torch.Tensor:
        """The images, mapped once per process (the splits of one file share the mapping)."""
        key = (self.path, tuple(self.shape))
        if key not in _MAPS:
            _MAPS[key] = self._map()
        return _MAPS[key]

    def _map(self) -> torch.Tensor:
        if not os.path.exists(self.path):
            import socket

            raise UserError(f"the decoded data {self.path} is not visible on {socket.gethostname()}: "
                            "put it on a file system every worker sees (--shared-data DIR)")
        n = math.prod(self.shape)
        return torch.from_file(self.path, shared=False, size=n, dtype=torch.uint8).view(
            *self.shape)


@dataclass
class SearchData:
    """What a search method may see: the training and validation splits, never the test one.

    There is deliberately no ``test`` attribute: a method that reaches for it fails at once
    instead of quietly tuning on the data its result is reported on.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    preprocessing: dict
    input_shape: tuple[int, int, int]
    notes: list[str] = field(default_factory=list)


@dataclass
class DataBundle:
    """Train, validation and test splits plus what a report needs to know about them.

    `test` is None when no test split was asked for (``test_fraction=0`` and no
    ``test_data``). Hand methods :meth:`for_search`, not the bundle.
    """

    train: Dataset
    val: Dataset
    num_classes: int
    class_names: list[str]
    preprocessing: dict  # JSON-serialisable: source, image size, mean, std, augmentation...
    input_shape: tuple[int, int, int]  # (C, H, W)
    notes: list[str] = field(default_factory=list)
    test: Dataset | None = None

    def for_search(self) -> SearchData:
        """The training and validation splits only (what methods and training loops get)."""
        return SearchData(self.train, self.val, self.num_classes, list(self.class_names),
                          self.preprocessing, self.input_shape, list(self.notes))


class ImageTensorDataset(Dataset):
    """Images held as one uint8 tensor, normalised (and optionally augmented) on the way out.

    ``dataset[i]`` returns ``(float tensor (C, H, W), int label)`` and draws its augmentation
    from torch's global RNG, so it works with any DataLoader. :meth:`get_batch` is the fast
    path: it builds a whole batch with one gather, and with ``aug_seed`` its random crops and
    flips are a function of (seed, index) only, so a batch is augmented the same however the
    epoch is split into batches or shared out between processes.
    """

    loss_fn = None  # the model's own loss and metric, set by `attach_hooks`
    metric = None

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], *, augment: bool = False, pad: int | None = None,
                 flip: bool = True, rows: torch.Tensor | None = None,
                 mapped: MappedFile | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        n = images.shape[0] if rows is None else len(rows)
        if labels.shape != (n,):
            raise ValueError("labels must have shape (N,)")
        self.images = images
        # `rows`: this dataset's images are images[rows] (a view of mapped data, no copy)
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long)
        self.mapped = mapped  # pickled by reference: workers map the file themselves
        self.labels = labels.long()
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.augment = augment
        self.pad = default_pad(images.shape[-2:]) if pad is None else int(pad)
        self.flip = flip
        # x_normalised = uint8 * scale - shift, with scale = 1/(255 std), shift = mean/std
        std_t = torch.tensor(self.std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1)
        self._shift = (torch.tensor(self.mean, dtype=torch.float32) / std_t).view(-1, 1, 1)
        self._device_cache: tuple | None = None  # (device, images, scale, shift)
        self._aug_cache: tuple | None = None  # (seed, dy, dx, flip)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def images(self) -> torch.Tensor:
        """uint8 (N, C, H, W); mapped data is mapped on first use (in a worker: by the task
        that needs it, so a worker that cannot see the file fails that task in one line)."""
        if self._images is None and self.mapped is not None:
            self._images = self.mapped.open()
        return self._images

    @images.setter
    def images(self, value: torch.Tensor | None) -> None:
        self._images = value

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_device_cache"] = state["_aug_cache"] = None  # caches, rebuilt where used
        if self.mapped is not None:
            state["_images"] = None  # the path travels, not the pixels
        return state

    def __getitem__(self, index: int):
        idx = torch.tensor([int(index)])
        x, y = self.get_batch(idx)
        return x[0], int(y[0])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self) else 0

    def subset(self, indices: Sequence[int]) -> "ImageTensorDataset":
        """The images at `indices`, with this dataset's normalisation, augmentation and
        hooks (the fast batch path included)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.rows is not None:  # a view: the same images, fewer rows
            out = ImageTensorDataset(self.images, self.labels[idx], self.mean, self.std,
                                     augment=self.augment, pad=self.pad, flip=self.flip,
                                     rows=self.rows[idx], mapped=self.mapped)
        else:
            out = ImageTensorDataset(self.images[idx], self.labels[idx], self.mean, self.std,
                                     augment=self.augment, pad=self.pad, flip=self.flip)
        out.loss_fn, out.metric = self.loss_fn, self.metric
        return out

    def augmentation_params(self, seed: int):
        """Per-image (dy, dx, flip) for the whole dataset, drawn from `seed` alone."""
        if self._aug_cache is not None and self._aug_cache[0] == seed:
            return self._aug_cache[1:]
        g = torch.Generator().manual_seed(int(seed))
        n = len(self)
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        fl = torch.randint(0, 2, (n,), generator=g).bool() & self.flip
        self._aug_cache = (seed, dy, dx, fl)
        return dy, dx, fl

    def get_batch(self, indices, *, augment: bool | None = None, aug_seed: int | None = None,
                  device: torch.device | str | None = None):
        """Return ``(x, y)`` for `indices`: x float32 (B, C, H, W) normalised, y int64 (B,).

        `augment` defaults to the dataset's own setting. With `aug_seed` the crop/flip of each
        image depends only on (aug_seed, index); without it, they come from torch's global
        RNG. `device` moves the batch there, keeping a copy of the uint8 images on it so
        that later batches gather on the device (150 MB for CIFAR-10).
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        augment = self.augment if augment is None else augment
        images, scale, shift = self._on(device)
        src = indices if self.rows is None else self.rows[indices]
        x = images[src.to(images.device)]
        if device is not None and x.device != torch.device(device):
            x = x.to(device)  # mapped data: gathered on the CPU, then moved
        if augment and (self.pad > 0 or self.flip):
            if aug_seed is None:
                n = len(indices)
                dy = torch.randint(0, 2 * self.pad + 1, (n,))
                dx = torch.randint(0, 2 * self.pad + 1, (n,))
                fl = torch.randint(0, 2, (n,)).bool() & self.flip
            else:
                dy, dx, fl = (t[indices] for t in self.augmentation_params(aug_seed))
            x = _crop_flip(x, dy.to(x.device), dx.to(x.device), fl.to(x.device), self.pad)
        x = x.float().mul_(scale).sub_(shift)
        y = self.labels[indices].to(x.device)
        return x, y

    def _on(self, device):
        if device is None or torch.device(device) == self.images.device:
            return self.images, self._scale, self._shift
        if self.mapped is not None:  # no device copy of a whole mapped data set
            device = torch.device(device)
            return self.images, self._scale.to(device), self._shift.to(device)
        device = torch.device(device)
        if self._device_cache is None or self._device_cache[0] != device:
            self._device_cache = (device, self.images.to(device), self._scale.to(device),
                                  self._shift.to(device))
        return self._device_cache[1:]


class UserDataset(Dataset):
    """A dataset from model.py's `datasets()` hook, as the training loop sees it: items pass
    through unchanged; `loss_fn` and `metric` are the model's own (None: the defaults)."""

    def __init__(self, base, loss_fn=None, metric=None):
        self.base, self.loss_fn, self.metric = base, loss_fn, metric

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index]

    def subset(self, indices: Sequence[int]) -> "UserDataset":
        return UserDataset(torch.utils.data.Subset(self.base, [int(i) for i in indices]),
                           self.loss_fn, self.metric)


def attach_hooks(bundle, loss_fn=None, metric=None):
    """Give every split of `bundle` the model's own loss and metric (model.py's `loss_fn`
    and `evaluate`), which `graphsearch.train` uses in place of cross-entropy and top-1."""
    for ds in (bundle.train, bundle.val, bundle.test):
        if ds is not None:
            ds.loss_fn, ds.metric = loss_fn, metric
    bundle.preprocessing = {**bundle.preprocessing,
                            "metric": "evaluate() of model.py" if metric else "top-1",
                            "loss": "loss_fn() of model.py" if loss_fn else "cross-entropy"}
    return bundle


def user_datasets(fn, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> DataBundle:
    """The splits model.py's `datasets()` returns: {"train", "val", "test"} or a tuple in that
    order; a missing test split is held out of train at random by `seed` (`test_fraction`),
    then a missing validation split (`val_fraction`, of the original train's size)."""
    try:
        got = fn()
    except Exception as exc:  # noqa: BLE001 - user code: one line
        raise UserError(f"datasets() in model.py failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(got, (tuple, list)):
        got = dict(zip(("train", "val", "test"), got))
    if not isinstance(got, dict) or got.get("train") is None:
        raise UserError("datasets() in model.py must return {'train': ..., 'val': ..., "
                        "'test': ...} ('val' and 'test' optional) or a tuple in that order")
    if "validation" in got and "val" not in got:
        got["val"] = got.pop("validation")
    unknown = sorted(set(got) - {"train", "val", "test"})
    if unknown:
        raise UserError(f"datasets() in model.py returned unknown splits {unknown}; use "
                        "'train', 'val' and 'test'")
    for role, ds in got.items():
        if ds is not None and not (hasattr(ds, "__len__") and hasattr(ds, "__getitem__")):
            raise UserError(f"datasets()['{role}'] in model.py is a {type(ds).__name__}, not "
                            "a map-style dataset (with __len__ and __getitem__)")
    train = got["train"]
    if len(train) == 0:
        raise UserError("datasets()['train'] in model.py is empty")
    n = len(train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    pos = 0
    parts = {}
    sources = {}
    for role, frac in (("test", test_fraction), ("val", val_fraction)):
        if got.get(role) is not None:
            parts[role] = got[role]
            sources[role] = f"datasets()['{role}'] of model.py"
            continue
        k = round(n * frac) if frac > 0 else 0
        if frac > 0:
            k = min(max(k, 1), n - pos - 1)
        parts[role] = torch.utils.data.Subset(train, sorted(perm[pos:pos + k]))
        sources[role] = (f"{frac:g} of datasets()['train'] of model.py, held out at random by "
                         f"seed {seed}" if k else "none")
        pos += k
    rest = sorted(perm[pos:])
    train_ds = UserDataset(train if pos == 0 else torch.utils.data.Subset(train, rest))
    val = UserDataset(parts["val"])
    test = UserDataset(parts["test"]) if len(parts["test"]) else None
    preprocessing = {"source": "datasets() of model.py", "format": "user",
                     "augmentation": "whatever datasets() does",
                     "val_fraction": 0.0 if got.get("val") is not None else float(val_fraction),
                     "test_fraction": 0.0 if got.get("test") is not None
                     else float(test_fraction),
                     "split_seed": int(seed), "num_train": len(train_ds), "num_val": len(val),
                     "num_test": len(test) if test is not None else 0,
                     "val_source": sources["val"], "test_source": sources["test"]}
    return DataBundle(train=train_ds, val=val, num_classes=0, class_names=[],
                      preprocessing=preprocessing, input_shape=None, notes=[], test=test)


def default_pad(hw: Sequence[int]) -> int:
    """Padding of the random crop: 4 pixels for 32x32 images, scaled as size/8 otherwise."""
    return max(1, round(min(int(hw[0]), int(hw[1])) / 8))


def _crop_flip(x: torch.Tensor, dy, dx, flip, pad: int) -> torch.Tensor:
    """Random crop after zero padding plus horizontal flip, for a whole uint8 batch at once.

    Padding with 0 (black) before normalisation matches torchvision's
    ``RandomCrop(size, padding)``; the crop and the flip become one advanced-indexing gather.
    """
    b, c, h, w = x.shape
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy.view(b, 1) + ar_h.view(1, h)
    cols = torch.where(flip.view(b, 1), (w - 1 - ar_w).view(1, w), ar_w.view(1, w)) + dx.view(b, 1)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return x[bi, ci, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


# --------------------------------------------------------------------------------------------
# Entry point


def load_dataset(spec: str | os.PathLike | None, *, val_fraction: float = 0.1,
                 test_fraction: float = 0.0, seed: int = 0,
                 val_data: str | os.PathLike | None = None,
                 test_data: str | os.PathLike | None = None,
                 image_size: int | Sequence[int] | None = None,
                 cache_dir: str | os.PathLike | bool | None = None,
                 augment: bool = True, mapped: bool | None = None) -> DataBundle:
    """Load `spec` (see the module docstring) into training, validation and test splits.

    Test: all of `test_data` if given, else `test_fraction` of every class of `spec` held out
    by `seed` (0, the library default, gives no test split; `graphsearch optimize` holds out
    10%). Validation: all of `val_data` if given, else `val_fraction` of every class of `spec`
    (at least one image of each class with two or more; 0 gives an empty validation set).
    The test split is drawn first and does not depend on `val_fraction`. Normalisation
    statistics come from the training split alone. `val_data` and `test_data` take the same
    formats as `spec`, are resized to the training images' size, and must use class names
    of `spec`; synthetic ones are drawn with seeds of their own, so they never repeat a
    training image. `image_size` (int or (H, W)) resizes all images; without it, all images
    of `spec` must share one size. `cache_dir=False` disables the decode cache.
    `augment=False` turns off the training augmentation. `mapped` (see `load_images`): the
    splits of `spec` are views of the memory-mapped decode cache, pickled as its path, so
    that workers read the images from the file instead of receiving them.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(f) < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {f}")
    vf = 0.0 if val_data is not None else float(val_fraction)
    tf = 0.0 if test_data is not None else float(test_fraction)
    if vf + tf >= 1.0:
        raise UserError(f"val_fraction {vf} + test_fraction {tf} leave no training data; "
                        "choose fractions that sum to less than 1")
    _refuse_same_source(spec, val_data, "--val-data")
    _refuse_same_source(spec, test_data, "--test-data")
    if val_data is not None and test_data is not None:
        _refuse_same_source(val_data, test_data, "--test-data", other="--val-data")
    raw = load_images(spec, seed=seed, image_size=image_size, cache_dir=cache_dir,
                      mapped=mapped)
    train_idx, val_idx, test_idx = split_roles(raw.labels, vf, tf, seed, len(raw.class_names))
    notes = list(raw.notes)
    if raw.mapped is not None:
        sample = train_idx
        if len(train_idx) > MEAN_STD_SAMPLE:
            g = torch.Generator().manual_seed(int(seed))
            sample = train_idx[torch.randperm(len(train_idx), generator=g)[:MEAN_STD_SAMPLE]]
            sample = sample.sort().values
            notes.append(f"mean and std from {MEAN_STD_SAMPLE} training images drawn by seed "
                         f"{seed}")
        mean, std = channel_mean_std(raw.images, sample)
    else:
        mean, std = channel_mean_std(raw.images[train_idx])
    pad = default_pad(raw.images.shape[-2:])
    c, h, w = raw.images.shape[1:]

    def part(idx, augment_it):
        """The images of `raw` at `idx`: a view of mapped data, else a copy."""
        if raw.mapped is not None:
            return ImageTensorDataset(raw.images, raw.labels[idx], mean, std,
                                      augment=augment_it, pad=pad, rows=idx,
                                      mapped=raw.mapped)
        return ImageTensorDataset(raw.images[idx], raw.labels[idx], mean, std,
                                  augment=augment_it, pad=pad)

    def own(role_spec, flag, role_index):
        images, labels, source, more = _load_role(role_spec, flag, raw, seed, role_index,
                                                  (int(h), int(w)), cache_dir)
        notes.extend(more)
        return images, labels, source

    def loaded(images, labels):
        return ImageTensorDataset(images, labels, mean, std, augment=False, pad=pad)

    if val_data is not None:
        *val_arrays, val_source = own(val_data, "--val-data", 1)
        val = loaded(*val_arrays)
    else:
        val = part(val_idx, False)
        val_source = (f"{vf:g} of each class of {raw.source}, held out by seed {seed}"
                      if len(val_idx) else "none")
    test = None
    if test_data is not None:
        *test_arrays, test_source = own(test_data, "--test-data", 2)
        test = loaded(*test_arrays)
    elif len(test_idx):
        test = part(test_idx, False)
        test_source = f"{tf:g} of each class of {raw.source}, held out by seed {seed}"
    else:
        test_source = "none"
    train = part(train_idx, augment)
    if raw.mapped is not None:
        notes.append(f"images memory-mapped from {raw.mapped.path} (workers read them there; "
                     "no check for copies between the splits)")
    for role, ds in (("validation", val), ("test", test)):
        if raw.mapped is None and ds is not None and len(ds):
            dup = _duplicates(train.images, ds.images)
            if dup:
                notes.append(f"{dup} of the {len(ds)} {role} images are exact copies of "
                             "training images")
    augmentation = (f"random crop {h}x{w} after {pad}-pixel zero padding + horizontal flip "
                    "(training split only)" if augment else "none")
    preprocessing = {
        "source": raw.source,
        "format": raw.format,
        "image_size": [int(h), int(w)],
        "channels": int(c),
        "mean": [round(m, 6) for m in mean],
        "std": [round(s, 6) for s in std],
        "normalisation": "per-channel (x/255 - mean) / std, mean and std of the training split",
        "augmentation": augmentation,
        "val_fraction": vf,
        "test_fraction": tf,
        "split_seed": int(seed),
        "data_images": int(len(raw.labels)),
        "num_train": int(len(train_idx)),
        "num_val": int(len(val)),
        "num_test": int(len(test)) if test is not None else 0,
        "val_source": val_source,
        "test_source": test_source,
    }
    return DataBundle(train=train, val=val, num_classes=len(raw.class_names),
                      class_names=list(raw.class_names), preprocessing=preprocessing,
                      input_shape=(int(c), int(h), int(w)), notes=notes, test=test)


def _same_path(a, b) -> bool:
    if a is None or b is None:
        return False
    if isinstance(a, str) and a.split(":", 1)[0] == "synthetic":
        return False
    if isinstance(b, str) and b.split(":", 1)[0] == "synthetic":
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _refuse_same_source(spec, other_spec, flag: str, other: str = "--data") -> None:
    if other_spec is None:
        return
    if _same_path(spec if spec is not None else "synthetic", other_spec):
        raise UserError(f"{flag} '{other_spec}' is the same as {other}: a split must hold "
                        f"images the other does not; pass other data to {flag}, or leave it "
                        "out to hold a split out of --data by the seed")


def _load_role(spec, flag: str, train_raw: RawImages, seed: int, role_index: int,
               size: tuple[int, int], cache_dir):
    """All of `spec` as the validation (role 1) or test (role 2) split of `train_raw`'s task:
    labels mapped by class name, images resized to the training size."""
    is_synthetic = spec is None or (isinstance(spec, str) and
                                    spec.split(":", 1)[0] == "synthetic")
    if is_synthetic:
        # Another seed stream: the same task (class definitions), other samples.
        role_seed = int(seed) + 1_000_000_007 * role_index
        if train_raw.format == "synthetic":
            k_train = len(train_raw.class_names)
            try:
                _, k, looks = _parse_synthetic(spec)
            except UserError as exc:
                raise UserError(f"{flag}: {exc}") from None
            if k != k_train:
                raise UserError(f"{flag} '{spec}' has {k} classes but the training data "
                                f"'{train_raw.source}' has {k_train}; synthetic sets with "
                                "other class counts are other tasks: give the same K")
            if looks != _parse_synthetic(train_raw.source)[2]:
                raise UserError(f"{flag} '{spec}' has other looks per class than the training "
                                f"data '{train_raw.source}': another task; give the same L")
    else:
        role_seed = seed
    try:
        raw = load_images(spec, seed=role_seed, image_size=size, cache_dir=cache_dir)
    except UserError as exc:
        raise UserError(f"{flag}: {exc}") from None
    index = {n: i for i, n in enumerate(train_raw.class_names)}
    present = sorted(set(raw.labels.tolist()))
    unknown = [raw.class_names[i] for i in present if raw.class_names[i] not in index]
    if unknown:
        raise UserError(f"{flag} '{spec}' has classes the training data lacks: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}; its "
                        "class folders (or CIFAR label names) must be those of --data "
                        f"({', '.join(train_raw.class_names[:5])}"
                        f"{' ...' if len(train_raw.class_names) > 5 else ''})")
    mapping = torch.tensor([index.get(n, -1) for n in raw.class_names], dtype=torch.long)
    labels = mapping[raw.labels]
    notes = [f"{flag}: {n}" for n in raw.notes]
    missing = len(train_raw.class_names) - len(present)
    if missing:
        notes.append(f"{flag}: {missing} of the {len(train_raw.class_names)} classes have no "
                     "image")
    return raw.images, labels, raw.source, notes


def _duplicates(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many images of `b` are byte-for-byte copies of an image of `a`."""
    if len(a) == 0 or len(b) == 0 or a.shape[1:] != b.shape[1:]:
        return 0
    seen = {hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest() for x in a}
    return sum(hashlib.blake2b(x.numpy().tobytes(), digest_size=16).digest() in seen
               for x in b)


def load_images(spec: str | os.PathLike | None, *, seed: int = 0,
                image_size: int | Sequence[int] | None = None,
                cache_dir: str | os.PathLike | bool | None = None,
                mapped: bool | None = None) -> RawImages:
    """Decode `spec` into a :class:`RawImages` (cached for files and folders).

    `mapped=True`: decode into the cache folder as one raw file, streamed (one image in
    memory at a time), and memory-map it (`RawImages.mapped`); a synthetic set is generated
    in chunks into it (other draws than the in-memory set of the same spec). `False`: hold
    the images in memory. `None` (default): mapped when the decoded images would take more
    than MAP_ABOVE_BYTES and there is a cache folder."""
    size = _parse_size(image_size)
    folder = _resolve_cache_dir(cache_dir)
    if mapped and folder is None:
        raise UserError("memory-mapped data is decoded into the cache folder: give one "
                        "(--shared-data DIR) instead of disabling the cache")
    if spec is None or (isinstance(spec, str) and spec.split(":", 1)[0] == "synthetic"):
        n, k, looks = _parse_synthetic(spec)
        hw = size or (32, 32)
        if mapped or (mapped is None and folder is not None
                      and n * 3 * hw[0] * hw[1] > MAP_ABOVE_BYTES):
            return _mapped_synthetic(n, k, hw, seed, folder, looks=looks)
        images, labels = synthetic_images(n, k, hw, seed=seed, looks=looks)
        return RawImages(images, labels, [f"class_{i}" for i in range(k)],
                         _synthetic_name(n, k, looks), "synthetic")
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"data '{spec}' does not exist; pass an ImageFolder (folder, .zip or "
                        ".tar.gz with one subfolder per class), CIFAR python batches, or "
                        "'synthetic' for built-in synthetic data")
    if mapped or (mapped is None and folder is not None
                  and _decoded_bytes(path, size) > MAP_ABOVE_BYTES):
        return _mapped_source(path, size, folder)
    cache_file = _cache_file(folder, path, size) if folder is not None else None
    if cache_file is not None and cache_file.exists():
        raw = _read_cache(cache_file)
        if raw is not None:
            raw.notes.append(f"decoded images read from cache {cache_file}")
            return raw
    with _open_container(path) as container:
        raw = _decode_container(container, size)
    if cache_file is not None:
        _write_cache(cache_file, raw)
    return raw


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int,
                  num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split: hold out `val_fraction` of each class, chosen by `seed`.

    Returns sorted (train, val) index tensors; they are disjoint and cover all indices.
    """
    labels = torch.as_tensor(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    g = torch.Generator().manual_seed(int(seed))
    train_parts, val_parts = [], []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        if val_fraction > 0 and len(idx) >= 2:
            # Every class shows up on both sides, even for tiny data sets.
            n_val = min(max(n_val, 1), len(idx) - 1)
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    empty = torch.zeros(0, dtype=torch.long)
    train = torch.cat(train_parts).sort().values if train_parts else empty
    val = torch.cat(val_parts).sort().values if val_parts else empty
    return train, val


def split_roles(labels: torch.Tensor, val_fraction: float, test_fraction: float, seed: int,
                num_classes: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified three-way split: (train, val, test) sorted index tensors, disjoint, covering
    all indices.

    Each class is permuted by `seed`; its first round(n * test_fraction) images go to test,
    the next round(n * val_fraction) to validation, the rest to training. The test split thus
    depends on (seed, test_fraction) only, and with ``test_fraction=0`` the result is
    :func:`split_indices`'s. A class with two or more images keeps at least one for
    training and gives each asked-for held-out split at least one while it can.
    """
    labels = torch.as_tensor(labels)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    g = torch.Generator().manual_seed(int(seed))
    parts: tuple[list, list, list] = ([], [], [])
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        n_test = round(n * test_fraction)
        if test_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        n_val = round(n * val_fraction)
        if val_fraction > 0 and n - n_test >= 2:
            n_val = max(n_val, 1)
        n_val = max(0, min(n_val, n - n_test - 1)) if n else 0
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    empty = torch.zeros(0, dtype=torch.long)
    train, val, test = (torch.cat(p).sort().values if p else empty for p in parts)
    return train, val, test


def channel_mean_std(images: torch.Tensor, rows: torch.Tensor | None = None,
                     chunk_bytes: int = 64 * 2 ** 20) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (of `images[rows]` when `rows` is given) on
    the [0, 1] scale.

    Computed from a 256-bin histogram per channel: exact, and ~10x faster than summing a
    float copy (0.25 s instead of 2 s for CIFAR-10's training split); `rows` are read
    `chunk_bytes` at a time (mapped data is never read into memory whole).
    """
    c = images.shape[1]
    n = images.shape[0] if rows is None else len(rows)
    chunk = max(1, chunk_bytes // max(1, math.prod(images.shape[1:])))
    if n == 0:
        return [0.5] * c, [0.25] * c
    values = torch.arange(256, dtype=torch.float64) / 255.0
    hists = torch.zeros(c, 256, dtype=torch.float64)
    parts = [images] if rows is None else (images[rows[i:i + chunk]]
                                          for i in range(0, n, chunk))
    for part in parts:
        for ch in range(c):
            hists[ch] += torch.bincount(part[:, ch].reshape(-1), minlength=256).to(torch.float64)
    means, stds = [], []
    for ch in range(c):
        hist = hists[ch]
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))  # a constant channel must not divide by 0
    return means, stds


# --------------------------------------------------------------------------------------------
# Synthetic data


def synthetic_images(n: int = SYNTHETIC_DEFAULT_IMAGES,
                     num_classes: int = SYNTHETIC_DEFAULT_CLASSES,
                     size: Sequence[int] = (32, 32), *, seed: int = 0,
                     looks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` RGB uint8 images (n, 3, H, W) of `num_classes` classes, determined by `seed`.

    A look is a fixed combination of three cues: the orientation and frequency of a grating,
    a colour, and the position of a blob. Each image draws a random phase, contrast, blob
    shift (up to size/8 pixels), brightness and pixel noise. By default a class is one look;
    with `looks` L > `num_classes`, look j belongs to class j mod K, so a class is the union
    of about L/K unrelated looks whose cues sit closer together: a task where a network's
    capacity shows (the demo's). The definitions are the same for every seed (the task does
    not change); the seed picks the samples. Labels are balanced and in random order.
    """
    h, w = int(size[0]), int(size[1])
    k = int(num_classes)
    looks = k if looks is None else int(looks)
    proto = torch.Generator().manual_seed(1_000_003 + k + (0 if looks == k else 7919 * looks))
    # Orientations spread over 180 degrees but visited in a scrambled order, so neighbouring
    # labels do not look alike; colours and blob positions are shuffled independently.
    theta = math.pi * torch.randperm(looks, generator=proto).float() / looks
    freq = 1.5 + 2.0 * torch.rand(looks, generator=proto)  # cycles per image
    hue = 2 * math.pi * torch.randperm(looks, generator=proto).float() / looks
    colour = torch.stack([torch.cos(hue + o) for o in (0.0, 2.1, 4.2)], 1)  # (L, 3) in [-1, 1]
    blob_pos = 0.2 + 0.6 * torch.rand(looks, 2, generator=proto)  # (y, x) in [0.2, 0.8]
    blob_col = torch.stack([torch.cos(hue * 2 + 1 + o) for o in (0.0, 2.1, 4.2)], 1)

    g = torch.Generator().manual_seed(int(seed))
    look = torch.arange(n) % looks
    look = look[torch.randperm(n, generator=g)]
    labels = look % k
    yy = torch.linspace(0, 1, h).view(1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, w)
    th, fr = theta[look].view(n, 1, 1), freq[look].view(n, 1, 1)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    grating = torch.cos(2 * math.pi * fr * (xx * torch.cos(th) + yy * torch.sin(th)) + phase)
    contrast = 0.15 + 0.15 * torch.rand(n, 1, 1, 1, generator=g)
    img = 0.5 + contrast * grating.unsqueeze(1) * (0.5 + 0.5 * colour[look].view(n, 3, 1, 1))
    shift = (torch.rand(n, 2, generator=g) - 0.5) * 0.25
    centre = blob_pos[look] + shift
    r2 = (yy - centre[:, 0].view(n, 1, 1)) ** 2 + (xx - centre[:, 1].view(n, 1, 1)) ** 2
    blob = torch.exp(-r2 / (2 * 0.08 ** 2)).unsqueeze(1)
    img = img + 0.3 * blob * blob_col[look].view(n, 3, 1, 1)
    img = img + 0.1 * (torch.rand(n, 1, 1, 1, generator=g) - 0.5)  # brightness
    img = img + 0.12 * torch.randn(n, 3, h, w, generator=g)  # pixel noise
    images = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels


def _parse_synthetic(spec: str | None) -> tuple[int, int, int]:
    """(images, classes, looks) of a synthetic spec."""
    if spec is None or spec == "synthetic":
        return SYNTHETIC_DEFAULT_IMAGES, SYNTHETIC_DEFAULT_CLASSES, SYNTHETIC_DEFAULT_CLASSES
    parts = spec.split(":")[1:]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or len(values) != len(parts):
        raise UserError(f"cannot read '{spec}': write 'synthetic', 'synthetic:N' (N images), "
                        "'synthetic:N:K' (N images of K classes) or 'synthetic:N:K:L' (each "
                        "class the union of L/K looks)")
    n = values[0]
    k = values[1] if len(values) >= 2 else SYNTHETIC_DEFAULT_CLASSES
    looks = values[2] if len(values) == 3 else k
    if k < 2 or n < 2 * k:
        raise UserError(f"'{spec}' needs at least 2 classes and 2 images per class "
                        f"(got {n} images of {k} classes)")
    if looks % k or n < looks:
        raise UserError(f"'{spec}': the looks L must be a multiple of the classes K (so the "
                        f"classes stay balanced) and at most the images N (got L={looks}, "
                        f"K={k}, N={n})")
    return n, k, looks


def _synthetic_name(n: int, k: int, looks: int) -> str:
    return f"synthetic:{n}:{k}" + (f":{looks}" if looks != k else "")


def _parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1:
        raise UserError(f"image_size must be a positive int or (height, width), got {image_size}")
    return size


# --------------------------------------------------------------------------------------------
# Containers: a folder, a zip or a tar, seen as a list of relative file names


class _Container:
    """Files of a folder or an archive, named by POSIX paths relative to its root."""

    def __init__(self, path: Path):
        self.path = path
        self.names: list[str] = []

    def read(self, names: Sequence[str]) -> Iterator[tuple[str, bytes]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def where(self, name: str) -> str:
        """How to point the user at one file of the container."""
        return f"'{name}' in '{self.path}'"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Folder(_Container):
    def __init__(self, path: Path):
        super().__init__(path)
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            rel = Path(root).relative_to(path)
            for f in sorted(files):
                if not f.startswith("."):
                    self.names.append((rel / f).as_posix())

    def read(self, names):
        for name in names:
            try:
                yield name, (self.path / name).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read '{self.path / name}': {exc}") from exc

    def where(self, name):
        return f"'{self.path / name}'"


class _Zip(_Container):
    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self.zip = zipfile.ZipFile(path)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise UserError(f"'{path}' is not a readable zip file ({exc}); the file may be "
                            "truncated or corrupt: download or create it again") from exc
        self.names = [i.filename for i in infos if not i.is_dir()]

    def read(self, names):
        for name in names:
            try:
                yield name, self.zip.read(name)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise UserError(f"cannot read {self.where(name)} ({exc}); the zip file is "
                                "corrupt: download or create it again") from exc

    def close(self):
        self.zip.close()


class _Tar(_Container):
    def __init__(self, path: Path):
        super().__init__(path)
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {}
            for m in self.tar.getmembers():
                if m.isfile():
                    name = m.name[2:] if m.name.startswith("./") else m.name
                    self.members[name] = m
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UserError(f"'{path}' is not a readable tar archive ({exc}); the file may be "
                            "truncated or corrupt: download or create it again") from exc
        self.names = list(self.members)

    def read(self, names):
        # In archive order: a .tar.gz can only be read forwards without re-decompressing.
        order = sorted(names, key=lambda n: self.members[n].offset)
        for name in order:
            try:
                yield name, self.tar.extractfile(self.members[name]).read()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
                raise UserError(f"cannot read {self.where(name)} ({exc}); the archive is "
                                "corrupt: download or create it again") from exc

    def close(self):
        self.tar.close()


def _open_container(path: Path) -> _Container:
    if path.is_dir():
        return _Folder(path)
    if zipfile.is_zipfile(path):
        return _Zip(path)
    if path.suffix.lower() == ".zip":
        raise UserError(f"'{path}' is not a readable zip file; it may be truncated or corrupt: "
                        "download or create it again")
    try:
        is_tar = tarfile.is_tarfile(path)
    except (OSError, EOFError, zlib.error):
        is_tar = False
    if is_tar:
        return _Tar(path)
    if any(path.name.lower().endswith(s) for s in (".tar", ".tar.gz", ".tgz")):
        raise UserError(f"'{path}' is not a readable tar archive; it may be truncated or "
                        "corrupt: download or create it again")
    raise UserError(f"cannot tell the format of '{path}': expected a folder, a .zip or a "
                    ".tar.gz holding an ImageFolder (one subfolder per class) or CIFAR python "
                    "batches (data_batch_1..5 and batches.meta)")


# --------------------------------------------------------------------------------------------
# Decoding


_CIFAR10_BATCH = re.compile(r"(^|/)data_batch_(\d+)$")


def _decode_container(container: _Container, size, rows_into=None) -> RawImages:
    names = container.names
    batches = [n for n in names if _CIFAR10_BATCH.search(n)]
    if batches:
        return _decode_cifar(container, sorted(batches, key=_batch_number), "batches.meta",
                             size)
    by_base = {n.rsplit("/", 1)[-1]: n for n in names}
    if "train" in by_base and "meta" in by_base and not _image_names(names):
        return _decode_cifar(container, [by_base["train"]], "meta", size)
    return _decode_imagefolder(container, size, rows_into)


def _batch_number(name: str) -> int:
    return int(_CIFAR10_BATCH.search(name).group(2))


def _image_names(names: Iterable[str]) -> list[str]:
    out = []
    for n in names:
        parts = n.split("/")
        if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
            continue  # macOS resource forks and hidden files are not images of the set
        if n.lower().endswith(IMAGE_EXTENSIONS):
            out.append(n)
    return out


def _decode_imagefolder(container: _Container, size, rows_into=None) -> RawImages:
    files = _image_names(container.names)
    where = f"'{container.path}'"
    if not files:
        raise UserError(f"no images found in {where} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}); an ImageFolder holds one subfolder per "
                        "class with the images inside (root/cat/1.png, root/dog/2.png, ...)")
    parts = [f.split("/") for f in files]
    prefix: list[str] = []
    notes = []
    while True:
        # One folder above the class folders (train/<class>/x.png): step into it.
        if all(len(p) >= 3 for p in parts) and len({p[0] for p in parts}) == 1:
            prefix.append(parts[0][0])
            parts = [p[1:] for p in parts]
            continue
        # Split folders at the top (train/, test/): use the training one.
        tops = {p[0] for p in parts}
        if (len(tops) > 1 and all(len(p) >= 3 for p in parts)
                and {t.lower() for t in tops} <= SPLIT_FOLDER_NAMES
                and any(t.lower() in ("train", "training") for t in tops)):
            train_top = next(t for t in sorted(tops) if t.lower() in ("train", "training"))
            notes.append(f"using the '{train_top}' folder of {where}; ignoring "
                         f"{', '.join(sorted(tops - {train_top}))}")
            prefix.append(train_top)
            keep = [i for i, p in enumerate(parts) if p[0] == train_top]
            files = [files[i] for i in keep]
            parts = [parts[i][1:] for i in keep]
            continue
        break
    loose = [f for f, p in zip(files, parts) if len(p) == 1]
    pairs = [(p[0], f) for f, p in zip(files, parts) if len(p) >= 2]
    root = "/".join(prefix) or "."
    if not pairs:
        raise UserError(f"the images in {where} (under '{root}') are not in class folders; an "
                        "ImageFolder holds one subfolder per class (root/cat/1.png, "
                        "root/dog/2.png, ...)")
    if loose:
        notes.append(f"ignored {len(loose)} image(s) outside class folders in {where}, "
                     f"e.g. '{loose[0]}'")
    class_names = sorted({c for c, _ in pairs})
    if len(class_names) < 2:
        raise UserError(f"only one class folder ('{class_names[0]}') found in {where} under "
                        f"'{root}'; classification needs at least two classes, one subfolder "
                        "per class")
    pairs.sort(key=lambda cf: (cf[0], cf[1]))
    index = {c: i for i, c in enumerate(class_names)}
    labels = torch.tensor([index[c] for c, _ in pairs], dtype=torch.long)
    images = _decode_images(container, [f for _, f in pairs], size, notes, rows_into)
    return RawImages(images, labels, class_names, str(container.path), "imagefolder", notes)


def _decode_images(container: _Container, names: list[str], size,
                   notes: list[str] | None = None, rows_into=None) -> torch.Tensor | None:
    """Decode `names` (in this order) into one uint8 (N, 3, H, W) tensor; with `rows_into`
    (a function of the shape (N, 3, H, W) returning a `_RowWriter`), into that instead, one
    image at a time, and return None.

    Every image becomes 8-bit RGB: grayscale, palette, CMYK and alpha images as Pillow
    converts them (an alpha channel is dropped), 16-bit and 32-bit grayscale scaled to 8 bits
    (Pillow's own conversion would clip them to white); how many of each is added to `notes`.

    Serial on purpose: for CIFAR-sized images Pillow's per-image overhead dominates and
    threads only add GIL contention (measured), and processes would copy every image twice.
    """
    from PIL import Image, UnidentifiedImageError

    position = {n: i for i, n in enumerate(names)}
    out: np.ndarray | None = None
    first = None
    converted: dict[str, int] = {}
    for name, blob in container.read(names):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.mode != "RGB":  # convert() copies even when nothing changes
                    converted[im.mode] = converted.get(im.mode, 0) + 1
                    im = _to_rgb(im)
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(im)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                SyntaxError) as exc:
            raise UserError(f"cannot decode image {container.where(name)} ({exc}); remove or "
                            "replace that file") from exc
        if out is None:
            out = (np.empty((len(names),) + arr.shape, dtype=np.uint8) if rows_into is None
                   else _Shaped(rows_into((len(names), arr.shape[2], *arr.shape[:2])),
                                (len(names),) + arr.shape))
            first = name
        elif arr.shape != out.shape[1:]:
            raise UserError(
                f"images differ in size: {container.where(first)} is "
                f"{out.shape[2]}x{out.shape[1]} but {container.where(name)} is "
                f"{arr.shape[1]}x{arr.shape[0]}; all images of a data set must have one size: "
                "resize them to one (e.g. the model's input size) before the run, or from "
                "Python give load_dataset(..., image_size=(H, W))")
        out[position[name]] = arr
    if converted and notes is not None:
        notes.append("converted to RGB: " + ", ".join(
            f"{n} {mode} image{'s' if n > 1 else ''}" for mode, n in sorted(converted.items()))
            + (" (alpha dropped)" if any("A" in m or m == "P" for m in converted) else "")
            + (" (16/32-bit scaled to 8-bit)" if any(m.startswith(("I", "F"))
                                                      for m in converted) else ""))
    if rows_into is not None:
        return None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


class _RowWriter:
    """Writes image i (a (C, H, W) uint8 array) at its place in an open file of N images."""

    def __init__(self, f, shape):
        self.f, self.shape = f, tuple(shape)
        self.row = math.prod(self.shape[1:])
        f.truncate(self.shape[0] * self.row)

    def __setitem__(self, i: int, chw: np.ndarray) -> None:
        self.f.seek(int(i) * self.row)
        self.f.write(np.ascontiguousarray(chw, dtype=np.uint8).tobytes())


class _Shaped:
    """`_decode_images`' target when it streams: HWC images in, CHW rows out."""

    def __init__(self, writer: _RowWriter, shape_hwc):
        self.writer, self.shape = writer, shape_hwc

    def __setitem__(self, i, hwc):
        self.writer[i] = np.asarray(hwc).transpose(2, 0, 1)


def _to_rgb(im):
    """An image of any Pillow mode as 8-bit RGB; high-bit-depth grayscale ("I;16", "I", "F")
    scaled to 0..255 rather than clipped."""
    from PIL import Image

    if im.mode.startswith(("I;16", "I", "F")):
        a = np.asarray(im).astype(np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit range onto 8 bits
        elif im.mode == "F" and a.max(initial=0) <= 1.0:
            a = a * 255.0  # floats in [0, 1]
        a = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([a] * 3, axis=-1), "RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # Pillow's advice for palettes with transparency
    return im.convert("RGB")


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: numpy arrays and builtins only, never arbitrary code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol <= 2.
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            with warnings.catch_warnings():  # numpy 2 warns about the numpy.core alias
                warnings.simplefilter("ignore", DeprecationWarning)
                return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _unpickle(container: _Container, name: str, blob: bytes) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise UserError(f"cannot read CIFAR batch {container.where(name)} ({exc}); expected a "
                        "python pickle as in cifar-10-python.tar.gz") from exc
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR batch {container.where(name)} is not a dict")
    # Keys are bytes in the original (python 2) files and str in re-pickled ones.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode_cifar(container: _Container, batch_names: list[str], meta_base: str,
                  size) -> RawImages:
    folder = batch_names[0].rsplit("/", 1)[0] if "/" in batch_names[0] else ""
    meta_name = f"{folder}/{meta_base}" if folder else meta_base
    wanted = batch_names + ([meta_name] if meta_name in container.names else [])
    blobs = dict(container.read(wanted))
    images, labels = [], []
    for name in batch_names:
        d = _unpickle(container, name, blobs[name])
        data = d.get("data")
        lab = d.get("labels", d.get("fine_labels"))
        if data is None or lab is None:
            raise UserError(f"CIFAR batch {container.where(name)} lacks 'data' or 'labels'")
        data = np.asarray(data)
        side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
        if data.dtype != np.uint8 or data.ndim != 2 or 3 * side * side != data.shape[1]:
            raise UserError(f"CIFAR batch {container.where(name)}: 'data' must be uint8 of shape "
                            f"(N, 3*S*S), got {data.dtype} {data.shape}")
        if len(lab) != data.shape[0]:
            raise UserError(f"CIFAR batch {container.where(name)}: {data.shape[0]} images but "
                            f"{len(lab)} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, side, side).copy()))
        labels.append(torch.as_tensor(np.asarray(lab, dtype=np.int64)))
    images_t = torch.cat(images)
    labels_t = torch.cat(labels)
    num_classes = int(labels_t.max()) + 1
    notes = []
    if meta_name in blobs:
        meta = _unpickle(container, meta_name, blobs[meta_name])
        names = meta.get("label_names", meta.get("fine_label_names"))
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in (names or [])]
    else:
        class_names = []
        notes.append(f"no {meta_base} next to the CIFAR batches: classes are named by number")
    if len(class_names) < num_classes:
        class_names = [str(i) for i in range(num_classes)]
    if labels_t.min() < 0 or len(set(labels_t.tolist())) < 2:
        raise UserError(f"CIFAR batches in '{container.path}' need at least two classes with "
                        "non-negative labels")
    if size is not None and tuple(images_t.shape[-2:]) != tuple(size):
        images_t = _resize(images_t, size)
    return RawImages(images_t, labels_t, class_names, str(container.path), "cifar", notes)


def _resize(images: torch.Tensor, size, chunk: int = 2048) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 images, chunked to bound memory."""
    out = []
    for i in range(0, images.shape[0], chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=tuple(size), mode="bilinear",
                          antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Decode cache


def default_cache_dir() -> Path:
    """``$GRAPHSEARCH_CACHE`` or ``$XDG_CACHE_HOME/graphsearch`` (``~/.cache/graphsearch``),
    plus ``/datasets``."""
    return checkpoint.cache_root() / "datasets"


def _resolve_cache_dir(cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def _fingerprint(path: Path) -> list:
    """What must be unchanged for a cache entry to stay valid."""
    st = path.stat()
    if not path.is_dir():
        return [st.st_size, st.st_mtime_ns]
    # A folder's own mtime misses edits inside subfolders: hash every file's size and mtime
    # (one stat per file, ~0.2 s for 50,000 files; far less than decoding them).
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = Path(root) / f
            try:
                s = p.stat()
            except OSError:
                continue
            h.update(f"{p.relative_to(path).as_posix()}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return [h.hexdigest()]


def _cache_file(folder: Path, path: Path, size) -> Path:
    resolved = str(path.resolve())
    path_hash = hashlib.sha256(resolved.encode()).hexdigest()[:10]
    key = json.dumps([CACHE_VERSION, resolved, _fingerprint(path), list(size) if size else None])
    key_hash = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:40] or "data"
    return folder / f"{stem}-{path_hash}-{key_hash}.pt"


def _read_cache(file: Path) -> RawImages | None:
    try:
        d = checkpoint.load(file)
        raw = RawImages(d["images"], d["labels"], list(d["class_names"]), d["source"],
                        d["format"], list(d["notes"]))
        if raw.images.dtype != torch.uint8 or raw.images.shape[0] != raw.labels.shape[0]:
            raise ValueError("inconsistent cache entry")
        return raw
    except Exception as exc:  # noqa: BLE001 - a bad cache entry is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable data cache {file}: {exc}", stacklevel=3)
        return None


def _write_cache(file: Path, raw: RawImages) -> None:
    try:
        checkpoint.save_atomic({"images": raw.images, "labels": raw.labels,
                                "class_names": raw.class_names, "source": raw.source,
                                "format": raw.format, "notes": raw.notes,
                                "created": time.time()}, file)
    except OSError as exc:
        warnings.warn(f"could not write the data cache {file} ({exc}); decoding again next "
                      "time. Set GRAPHSEARCH_CACHE to a writable folder.", stacklevel=3)
        return
    # Older entries of the same source (it changed since) are stale: drop them.
    prefix = file.name.rsplit("-", 1)[0] + "-"
    for old in file.parent.glob(prefix + "*.pt"):
        if old != file:
            try:
                old.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# Mapped data: the decode cache as one raw file that the search and its workers map


def _decoded_bytes(path: Path, size) -> int:
    """About how many bytes `path` takes decoded: its images times one image's size (the
    first image's, without `size`); 0 for CIFAR batches (small by nature)."""
    with _open_container(path) as container:
        names = _image_names(container.names)
        if not names:
            return 0
        if size is None:
            from PIL import Image

            _, blob = next(iter(container.read(names[:1])))
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    size = (im.size[1], im.size[0])
            except Exception:  # noqa: BLE001 (the decoder will name the bad file)
                return 0
        return len(names) * 3 * int(size[0]) * int(size[1])


def _mapped_names(key_file: Path) -> tuple[Path, Path]:
    """(raw images, meta) files of a mapped cache entry, named apart from the in-memory
    entries of the same source (`_write_cache` prunes those by prefix)."""
    stem, rest = key_file.stem.split("-", 1) if "-" in key_file.stem else (key_file.stem, "")
    base = f"{stem}.mapped-{rest}"
    return key_file.with_name(base + ".u8"), key_file.with_name(base + ".pt")


def _read_mapped(raw_file: Path, meta_file: Path) -> RawImages | None:
    if not (raw_file.exists() and meta_file.exists()):
        return None
    try:
        d = checkpoint.load(meta_file)
        shape = tuple(int(v) for v in d["shape"])
        if raw_file.stat().st_size != math.prod(shape) or len(d["labels"]) != shape[0]:
            raise ValueError("the raw file does not hold the images its entry names")
        mapped = MappedFile(str(raw_file), shape)
        return RawImages(mapped.open(), d["labels"], list(d["class_names"]), d["source"],
                         d["format"], list(d["notes"]), mapped)
    except Exception as exc:  # noqa: BLE001 - a bad cache entry is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable data cache {meta_file}: {exc}", stacklevel=3)
        return None


def _write_mapped(raw_file: Path, meta_file: Path, fill) -> RawImages:
    """`fill(f)` writes the images row by row into the open file f and returns (a RawImages
    with the labels and names, its images unused; the shape (N, C, H, W)). The raw file is
    written first, then the entry that names it; then it is mapped."""
    made = {}

    def write(f):
        made["raw"], made["shape"] = fill(f)

    try:
        checkpoint.write_streamed(raw_file, write, every_rank=True)
        raw = made["raw"]
        checkpoint.save_atomic({"shape": [int(v) for v in made["shape"]], "labels": raw.labels,
                                "class_names": raw.class_names, "source": raw.source,
                                "format": raw.format, "notes": raw.notes,
                                "created": time.time()}, meta_file, every_rank=True)
    except OSError as exc:
        raise UserError(f"cannot write the decoded data to {raw_file.parent} ({exc}); give "
                        "--shared-data a writable folder with room for it") from exc
    out = _read_mapped(raw_file, meta_file)
    if out is None:
        raise UserError(f"the decoded data in {raw_file} cannot be read back")
    return out


def _mapped_source(path: Path, size, folder: Path) -> RawImages:
    """The images of a file or folder, decoded once into the cache (streamed), mapped."""
    raw_file, meta_file = _mapped_names(_cache_file(folder, path, size))
    raw = _read_mapped(raw_file, meta_file)
    if raw is not None:
        raw.notes.append(f"decoded images read from cache {raw_file}")
        return raw

    def fill(f):
        shape = {}

        def rows_into(s):
            shape["s"] = s
            return _RowWriter(f, s)

        with _open_container(path) as container:
            raw = _decode_container(container, size, rows_into)
        if raw.images is not None:  # decoded in memory (CIFAR batches): write it out
            f.write(raw.images.contiguous().numpy().tobytes())
            shape["s"] = tuple(raw.images.shape)
        return raw, shape["s"]

    return _write_mapped(raw_file, meta_file, fill)


def _mapped_synthetic(n: int, k: int, hw, seed: int, folder: Path,
                      chunk: int = 1000, looks: int | None = None) -> RawImages:
    """`synthetic:N:K[:L]` generated `chunk` images at a time into the cache, mapped."""
    looks = k if looks is None else looks
    name = (f"synthetic.mapped-{n}-{k}" + (f"-{looks}looks" if looks != k else "") +
            f"-{hw[0]}x{hw[1]}-seed{seed}-v{CACHE_VERSION}")
    raw_file, meta_file = folder / f"{name}.u8", folder / f"{name}.pt"
    raw = _read_mapped(raw_file, meta_file)
    if raw is not None:
        return raw

    def fill(f):
        labels = []
        for i, start in enumerate(range(0, n, chunk)):
            images, lab = synthetic_images(min(chunk, n - start), k, hw,
                                           seed=int(seed) * 1_000_003 + i, looks=looks)
            f.write(images.numpy().tobytes())
            labels.append(lab)
        raw = RawImages(None, torch.cat(labels), [f"class_{i}" for i in range(k)],
                        _synthetic_name(n, k, looks), "synthetic",
                        [f"synthetic images generated in chunks of {chunk}"])
        return raw, (n, 3, int(hw[0]), int(hw[1]))

    return _write_mapped(raw_file, meta_file, fill)
