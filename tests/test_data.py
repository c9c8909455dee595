"""Tests for graphsearch.data: every source format on tiny files made here, the split, the
normalisation and augmentation, the decode cache, and the errors for bad input."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from graphsearch.data import (ImageTensorDataset, _crop_flip, channel_mean_std, load_dataset,
                              load_images, split_indices, synthetic_images)
from graphsearch.load import UserError

CLASSES = ("cat", "dog", "emu")
PER_CLASS = 5
SIZE = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # The default cache lives in ~/.cache; tests must not write there.
    monkeypatch.setenv("GRAPHSEARCH_CACHE", str(tmp_path / "default-cache"))


def _image(cls: int, i: int) -> np.ndarray:
    """A deterministic, distinct SIZE x SIZE RGB image."""
    rng = np.random.default_rng(100 * cls + i)
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _files(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{c}/{i:02d}.png": _png(_image(k, i))
            for k, c in enumerate(CLASSES) for i in range(PER_CLASS)}


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, blob in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(blob)
    return root


def _write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in files.items():
            z.writestr(name, blob)
    return path


def _expected() -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels in ImageFolder order (sorted classes, sorted files)."""
    imgs = [_image(k, i) for k in range(len(CLASSES)) for i in range(PER_CLASS)]
    images = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2)
    labels = torch.arange(len(CLASSES)).repeat_interleave(PER_CLASS)
    return images, labels


def _cifar_batches(n_batches: int = 2, n: int = 6, side: int = 4):
    rng = np.random.default_rng(0)
    batches = []
    for b in range(n_batches):
        data = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        labels = [(b * n + i) % 3 for i in range(n)]
        batches.append({b"batch_label": f"training batch {b + 1}".encode(), b"data": data,
                        b"labels": labels, b"filenames": [b"x.png"] * n})
    meta = {b"label_names": [b"red", b"green", b"blue"], b"num_vis": 3 * side * side}
    return batches, meta


def _write_cifar(folder: Path, batches, meta) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, b in enumerate(batches, 1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(b, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


# ---------------------------------------------------------------------------------- formats


def test_imagefolder_folder_decodes_exact_pixels(tmp_path):
    root = _write_folder(tmp_path / "data", _files())
    raw = load_images(root, cache_dir=False)
    images, labels = _expected()
    assert raw.class_names == list(CLASSES)
    assert raw.format == "imagefolder"
    assert torch.equal(raw.images, images) and torch.equal(raw.labels, labels)

    bundle = load_dataset(root, val_fraction=0.2, cache_dir=False)
    assert bundle.num_classes == 3 and bundle.class_names == list(CLASSES)
    assert bundle.input_shape == (3, SIZE, SIZE)
    assert len(bundle.train) + len(bundle.val) == len(labels)
    assert torch.bincount(bundle.val.labels).tolist() == [1, 1, 1]  # stratified
    assert bundle.preprocessing["num_val"] == 3
    assert bundle.preprocessing["image_size"] == [SIZE, SIZE]


@pytest.mark.parametrize("prefix", ["", "train/", "data/train/"])
def test_imagefolder_zip_with_and_without_top_folder(tmp_path, prefix):
    path = _write_zip(tmp_path / "d.zip", _files(prefix))
    raw = load_images(path, cache_dir=False)
    images, labels = _expected()
    assert raw.class_names == list(CLASSES)
    assert torch.equal(raw.images, images) and torch.equal(raw.labels, labels)


def test_zip_with_split_folders_uses_train(tmp_path):
    files = _files("train/")
    files.update({f"test/{c}/x.png": _png(_image(0, 0)) for c in ("other1", "other2")})
    files["README.txt"] = b"not an image"
    files["__MACOSX/train/cat/._00.png"] = b"resource fork"
    raw = load_images(_write_zip(tmp_path / "d.zip", files), cache_dir=False)
    assert raw.class_names == list(CLASSES)
    assert len(raw.labels) == len(CLASSES) * PER_CLASS
    assert any("'train'" in n for n in raw.notes)


def test_tar_imagefolder(tmp_path):
    root = _write_folder(tmp_path / "data", _files())
    path = tmp_path / "d.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        t.add(root, arcname="images")
    raw = load_images(path, cache_dir=False)
    images, labels = _expected()
    assert torch.equal(raw.images, images) and torch.equal(raw.labels, labels)


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_batches_folder_and_tar(tmp_path, as_tar):
    batches, meta = _cifar_batches()
    folder = _write_cifar(tmp_path / "cifar-10-batches-py", batches, meta)
    (folder / "test_batch").write_bytes(pickle.dumps(batches[0]))  # never part of training
    path = folder
    if as_tar:
        path = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as t:
            t.add(folder, arcname="cifar-10-batches-py")
    raw = load_images(path, cache_dir=False)
    expect = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 4, 4)
    assert raw.format == "cifar"
    assert raw.class_names == ["red", "green", "blue"]
    assert torch.equal(raw.images, torch.from_numpy(expect))
    assert raw.labels.tolist() == [i % 3 for i in range(12)]
    bundle = load_dataset(path, val_fraction=0.25, cache_dir=False, image_size=8)
    assert bundle.input_shape == (3, 8, 8)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(UserError, match="data_batch_1.*refusing"):
        load_images(folder, cache_dir=False)


def test_image_size_resizes_mixed_sizes(tmp_path):
    files = _files()
    files["cat/big.png"] = _png(np.zeros((16, 12, 3), dtype=np.uint8))
    root = _write_folder(tmp_path / "data", files)
    with pytest.raises(UserError, match="differ in size.*image_size"):
        load_images(root, cache_dir=False)
    raw = load_images(root, cache_dir=False, image_size=6)
    assert raw.images.shape == (len(files), 3, 6, 6)


def test_grayscale_images_become_rgb(tmp_path):
    files = {f"{c}/{i}.png": _png(np.full((SIZE, SIZE), 10 * i, dtype=np.uint8))
             for c in ("a", "b") for i in range(2)}
    raw = load_images(_write_folder(tmp_path / "g", files), cache_dir=False)
    assert raw.images.shape == (4, 3, SIZE, SIZE)


# ------------------------------------------------------------------------------------ cache


def test_cache_is_written_reused_and_invalidated(tmp_path):
    path = _write_zip(tmp_path / "d.zip", _files("train/"))
    cache = tmp_path / "cache"
    first = load_images(path, cache_dir=cache)
    entries = list(cache.glob("*.pt"))
    assert len(entries) == 1 and not any("cache" in n for n in first.notes)
    second = load_images(path, cache_dir=cache)
    assert any("from cache" in n for n in second.notes)
    assert torch.equal(first.images, second.images) and second.class_names == first.class_names
    # The source changes: a new entry replaces the stale one.
    _write_zip(path, {**_files("train/"), "train/cat/extra.png": _png(_image(9, 9))})
    os.utime(path, ns=(1, 10**18))
    third = load_images(path, cache_dir=cache)
    assert len(third.labels) == len(first.labels) + 1
    assert len(list(cache.glob("*.pt"))) == 1 and list(cache.glob("*.pt")) != entries
    # A corrupt entry is rebuilt, not fatal.
    entry = next(cache.glob("*.pt"))
    entry.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable data cache"):
        fourth = load_images(path, cache_dir=cache)
    assert torch.equal(fourth.images, third.images)


def test_default_cache_dir_comes_from_env(tmp_path):
    root = _write_folder(tmp_path / "data", _files())
    load_images(root)  # cache_dir=None: $GRAPHSEARCH_CACHE (set by the fixture)
    assert list((tmp_path / "default-cache" / "datasets").glob("data-*.pt"))


# ------------------------------------------------------------------------------------ split


def test_split_is_deterministic_disjoint_and_stratified():
    labels = torch.arange(10).repeat_interleave(50)
    tr, va = split_indices(labels, 0.1, seed=3)
    tr2, va2 = split_indices(labels, 0.1, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(500))
    assert torch.bincount(labels[va]).tolist() == [5] * 10
    _, va3 = split_indices(labels, 0.1, seed=4)
    assert not torch.equal(va, va3)
    tr0, va0 = split_indices(labels, 0.0, seed=0)
    assert len(va0) == 0 and len(tr0) == 500


def test_load_dataset_split_depends_only_on_seed():
    a = load_dataset("synthetic:200:4", seed=1)
    b = load_dataset("synthetic:200:4", seed=1)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert len(a.val) == 20 and len(a.train) == 180
    with pytest.raises(UserError, match="val_fraction"):
        load_dataset("synthetic:200:4", val_fraction=1.0)


# ------------------------------------------------------------------ normalisation, augmentation


def test_normalisation_uses_train_statistics():
    bundle = load_dataset("synthetic:400:4", augment=False)
    x, _ = bundle.train.get_batch(torch.arange(len(bundle.train)))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    mean, std = channel_mean_std(bundle.train.images)
    assert bundle.preprocessing["mean"] == [round(m, 6) for m in mean]
    ref = bundle.train.images.double() / 255
    assert np.allclose(mean, ref.mean(dim=(0, 2, 3)).tolist())
    assert np.allclose(std, ref.std(dim=(0, 2, 3), correction=0).tolist())
    assert bundle.preprocessing["augmentation"] == "none"
    assert "4-pixel" in load_dataset("synthetic:40:4").preprocessing["augmentation"]


def test_crop_flip_moves_pixels_as_specified():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    # dy = dx = pad: the centre crop; image 1 flipped.
    out = _crop_flip(x, torch.tensor([1, 1]), torch.tensor([1, 1]), torch.tensor([False, True]), 1)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1].flip(-1))
    # dy = dx = 0: shifted down-right by one pixel, zero padding enters at the top-left.
    out = _crop_flip(x, torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([False, False]), 1)
    assert torch.equal(out[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert out[0, 0, 0].sum() == 0 and out[0, 0, :, 0].sum() == 0


def test_seeded_augmentation_does_not_depend_on_batching():
    bundle = load_dataset("synthetic:80:4")
    ds = bundle.train
    whole, _ = ds.get_batch(torch.arange(16), aug_seed=7)
    parts = torch.cat([ds.get_batch(torch.arange(i, i + 4), aug_seed=7)[0]
                       for i in range(0, 16, 4)])
    assert torch.equal(whole, parts)
    other, _ = ds.get_batch(torch.arange(16), aug_seed=8)
    assert not torch.equal(whole, other)
    plain, _ = ds.get_batch(torch.arange(16), augment=False)
    val_x, _ = bundle.val.get_batch(torch.arange(len(bundle.val)))
    val_again, _ = bundle.val.get_batch(torch.arange(len(bundle.val)), aug_seed=7)
    assert torch.equal(val_x, val_again)  # the validation split is never augmented
    assert not torch.equal(whole, plain)


def test_items_work_with_a_plain_dataloader():
    ds = load_dataset("synthetic:40:4").train
    x, y = next(iter(DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    item_x, item_y = ds[3]
    assert item_x.shape == (3, 32, 32) and isinstance(item_y, int)
    with pytest.raises(ValueError):
        ImageTensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2), [0.5] * 3, [0.2] * 3)


# ---------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_balanced():
    a, la = synthetic_images(60, 6, seed=0)
    b, lb = synthetic_images(60, 6, seed=0)
    c, _ = synthetic_images(60, 6, seed=1)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (60, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.bincount(la).tolist() == [10] * 6
    bundle = load_dataset(None)
    assert bundle.num_classes == 10 and len(bundle.train) + len(bundle.val) == 5000
    assert load_dataset("synthetic:100:5", image_size=(16, 24)).input_shape == (3, 16, 24)


def test_synthetic_looks_make_each_class_a_union_of_unrelated_looks():
    """`synthetic:N:K:L` (the demo's data): a class mixes L/K unrelated looks, so one template
    a class (the nearest class-mean image) reads far fewer held-out labels than with one look
    a class; the default (L = K) is the same data as before the option existed."""
    one, l1 = synthetic_images(400, 4, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((one, l1), synthetic_images(400, 4, seed=3,
                                                                             looks=4)))
    four, l4 = synthetic_images(400, 4, seed=3, looks=16)
    assert torch.bincount(l4).tolist() == [100] * 4

    def nearest_class_mean(looks):
        train, lt = synthetic_images(800, 4, seed=3, looks=looks)
        held, lh = synthetic_images(400, 4, seed=4, looks=looks)
        feats = [torch.nn.functional.avg_pool2d(x.float(), 4).flatten(1) for x in (train, held)]
        centres = torch.stack([feats[0][lt == c].mean(0) for c in range(4)])
        return (torch.cdist(feats[1], centres).argmin(1) == lh).float().mean().item()
    assert nearest_class_mean(16) < nearest_class_mean(4) - 0.15
    bundle = load_dataset("synthetic:400:4:16", val_data="synthetic:80:4:16")
    assert bundle.num_classes == 4 and len(bundle.val) == 80
    with pytest.raises(UserError, match="looks"):
        load_dataset("synthetic:400:4:16", val_data="synthetic:80:4")


@pytest.mark.parametrize("spec", ["synthetic:abc", "synthetic:1:2:3", "synthetic:10:1",
                                  "synthetic:3:4", "synthetic:100:10:15",
                                  "synthetic:100:2:4:8"])
def test_bad_synthetic_spec(spec):
    with pytest.raises(UserError, match="synthetic"):
        load_dataset(spec)


# ------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist.*ImageFolder"):
        load_dataset(tmp_path / "nope.zip")


def test_corrupt_zip(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UserError, match="bad.zip.*corrupt"):
        load_dataset(bad, cache_dir=False)
    # A zip whose central directory survives but whose data is damaged.
    good = _write_zip(tmp_path / "damaged.zip", _files())
    blob = bytearray(good.read_bytes())
    start = blob.index(b"IHDR")  # inside the first stored PNG
    blob[start:start + 40] = b"\x00" * 40
    good.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="cat/00.png.*corrupt"):
        load_dataset(good, cache_dir=False)


def test_truncated_tar(tmp_path):
    root = _write_folder(tmp_path / "data", _files())
    path = tmp_path / "d.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        t.add(root, arcname="images")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt"):
        load_dataset(path, cache_dir=False)


def test_undecodable_image_is_named(tmp_path):
    files = _files()
    files["dog/broken.png"] = b"\x89PNG\r\n\x1a\n not a png at all"
    root = _write_folder(tmp_path / "data", files)
    with pytest.raises(UserError, match=r"dog/broken\.png.*remove or replace"):
        load_dataset(root, cache_dir=False)


def test_empty_folder_and_one_class(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found.*one subfolder per class"):
        load_dataset(tmp_path / "empty", cache_dir=False)
    one = _write_folder(tmp_path / "one", {"cat/1.png": _png(_image(0, 0)),
                                           "cat/2.png": _png(_image(0, 1))})
    with pytest.raises(UserError, match="only one class folder \\('cat'\\).*two classes"):
        load_dataset(one, cache_dir=False)
    loose = _write_folder(tmp_path / "loose", {"1.png": _png(_image(0, 0))})
    with pytest.raises(UserError, match="not in class folders"):
        load_dataset(loose, cache_dir=False)


def test_unknown_format(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="cannot tell the format.*folder, a .zip"):
        load_dataset(f, cache_dir=False)


def test_bad_cifar_batch(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8),
                                                         b"labels": [0, 1]}))
    with pytest.raises(UserError, match="data_batch_1.*shape"):
        load_dataset(folder, cache_dir=False)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read CIFAR batch.*data_batch_1"):
        load_dataset(folder, cache_dir=False)


# ------------------------------------------------------------------ three roles: train/val/test


def test_split_roles_disjoint_stratified_and_test_independent_of_val():
    from graphsearch.data import split_roles

    labels = torch.arange(10).repeat_interleave(50)
    tr, va, te = split_roles(labels, 0.2, 0.1, seed=3)
    sets = [set(x.tolist()) for x in (tr, va, te)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sorted(tr.tolist() + va.tolist() + te.tolist()) == list(range(500))
    assert torch.bincount(labels[te]).tolist() == [5] * 10  # stratified
    assert torch.bincount(labels[va]).tolist() == [10] * 10
    # The test split depends on (seed, test_fraction) only, not on the validation share.
    _, _, te2 = split_roles(labels, 0.05, 0.1, seed=3)
    assert torch.equal(te, te2)
    assert not torch.equal(te, split_roles(labels, 0.2, 0.1, seed=4)[2])
    # Without a test split it is the two-way split of before.
    tr0, va0, te0 = split_roles(labels, 0.1, 0.0, seed=3)
    ref = split_indices(labels, 0.1, seed=3)
    assert len(te0) == 0 and torch.equal(tr0, ref[0]) and torch.equal(va0, ref[1])
    # Tiny classes keep a training image and give each held-out split one while they can.
    small = torch.tensor([0, 0, 0, 1, 1, 1])
    tr, va, te = split_roles(small, 0.1, 0.1, seed=0)
    assert torch.bincount(small[tr]).tolist() == [1, 1]
    assert torch.bincount(small[te]).tolist() == [1, 1]


def test_load_dataset_test_split_and_what_methods_get():
    b = load_dataset("synthetic:200:4", seed=1, test_fraction=0.1, cache_dir=False)
    assert (len(b.train), len(b.val), len(b.test)) == (160, 20, 20)
    p = b.preprocessing
    assert (p["num_train"], p["num_val"], p["num_test"]) == (160, 20, 20)
    assert "held out by seed 1" in p["test_source"] and "held out by seed 1" in p["val_source"]
    hashes = [{bytes(x.flatten().tolist()) for x in ds.images} for ds in (b.train, b.val, b.test)]
    assert not (hashes[0] & hashes[2] or hashes[1] & hashes[2] or hashes[0] & hashes[1])
    assert b.test.mean == b.train.mean  # normalised by the training statistics
    assert not b.test.augment and not b.val.augment
    view = b.for_search()
    assert not hasattr(view, "test")
    assert view.train is b.train and view.val is b.val
    assert load_dataset("synthetic:200:4", seed=1, cache_dir=False).test is None  # library default
    with pytest.raises(UserError, match="leave no training data"):
        load_dataset("synthetic:200:4", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(UserError, match="test_fraction"):
        load_dataset("synthetic:200:4", test_fraction=-0.1)


def test_own_test_and_val_data_of_the_same_task(tmp_path):
    b = load_dataset("synthetic:200:4", seed=0, val_data="synthetic:40:4",
                     test_data="synthetic:80:4", cache_dir=False)
    assert (len(b.train), len(b.val), len(b.test)) == (200, 40, 80)
    assert b.preprocessing["val_source"] == "synthetic:40:4"
    assert b.preprocessing["test_source"] == "synthetic:80:4"
    # Synthetic roles are drawn with their own seeds: no image repeats a training image.
    train = {bytes(x.flatten().tolist()) for x in b.train.images}
    assert not any(bytes(x.flatten().tolist()) in train for x in b.test.images)
    assert not any(bytes(x.flatten().tolist()) in train for x in b.val.images)
    assert not [n for n in b.notes if "exact copies" in n]
    with pytest.raises(UserError, match="--test-data 'synthetic:80:3' has 3 classes"):
        load_dataset("synthetic:200:4", test_data="synthetic:80:3")


def test_own_test_data_imagefolder_maps_classes_by_name_and_resizes(tmp_path):
    train = _write_folder(tmp_path / "train", _files())
    # A test set with two of the three classes, at another size.
    test = tmp_path / "test"
    for k, c in enumerate(CLASSES[1:], 1):
        (test / c).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 10 * k, np.uint8)).save(test / c / "a.png")
    b = load_dataset(train, val_fraction=0.2, test_data=test, cache_dir=False)
    assert b.test.images.shape == (2, 3, SIZE, SIZE)
    assert b.test.labels.tolist() == [1, 2]  # dog, emu: the training data's numbering
    assert len(b.train) == len(CLASSES) * PER_CLASS - len(b.val)  # nothing held out for test
    assert any("1 of the 3 classes have no image" in n for n in b.notes)
    # A class the training data lacks, the same folder, a missing path: clear errors.
    (test / "yak").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(test / "yak" / "b.png")
    with pytest.raises(UserError, match="--test-data .* has classes the training data lacks: yak"):
        load_dataset(train, test_data=test, cache_dir=False)
    with pytest.raises(UserError, match="--val-data .* is the same as --data"):
        load_dataset(train, val_data=str(train) + "/", cache_dir=False)
    with pytest.raises(UserError, match="^--test-data: data .* does not exist"):
        load_dataset(train, test_data=tmp_path / "nope.zip", cache_dir=False)


def test_copies_of_training_images_in_the_test_data_are_noted(tmp_path):
    train = _write_folder(tmp_path / "train", _files())
    copy = _write_folder(tmp_path / "copy", {k: v for k, v in _files().items()
                                             if k.endswith("00.png")})
    b = load_dataset(train, val_fraction=0.0, test_data=copy, cache_dir=False)
    assert "3 of the 3 test images are exact copies of training images" in b.notes
