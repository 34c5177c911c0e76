"""Tests of glag.data: LT profiles, the three dataset kinds, transforms, batch iteration.

All offline and small: Fashion-MNIST and CIFAR-100 are faked in tmp_path (gzip IDX files and
python pickles written here), list datasets use generated PNGs. One test reads the real Debian
Fashion-MNIST when it is installed.
"""
import gzip
import json
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glag.data import (DATASETS, DatasetCorruptError, DatasetNotFoundError, ListFileError,
                       build_dataset, iterate_batches, lt_profile, num_batches)
from glag.data import transforms as T
from glag.data.fmnist import DEFAULT_ROOT as FMNIST_DEFAULT_ROOT
from glag.data.fmnist import FILES as FMNIST_FILES
from glag.errors import UsageError

# --------------------------------------------------------------------------- fixtures


def write_idx(path, arr, compress=True):
    """Write uint8 ``arr`` as an IDX file (magic 0x0000 08 ndim)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.fixture
def fake_fmnist(tmp_path):
    """10 classes x 40 train images, 10 x 3 test images, 28x28, in gzip IDX files."""
    rng = np.random.RandomState(1)
    root = tmp_path / "fmnist"
    root.mkdir()
    ytr = rng.permutation(np.repeat(np.arange(10), 40)).astype(np.uint8)
    xtr = rng.randint(0, 256, size=(400, 28, 28)).astype(np.uint8)
    yte = np.repeat(np.arange(10), 3).astype(np.uint8)
    xte = rng.randint(0, 256, size=(30, 28, 28)).astype(np.uint8)
    write_idx(root / FMNIST_FILES["train_images"], xtr)
    write_idx(root / FMNIST_FILES["train_labels"], ytr)
    write_idx(root / FMNIST_FILES["test_images"], xte)
    write_idx(root / FMNIST_FILES["test_labels"], yte)
    return root, xtr, ytr.astype(np.int64)


def fmnist_small(root, **kw):
    args = dict(root=root, n_max=20, imbalance_factor=10.0, val_per_class=5, seed=0)
    args.update(kw)
    return build_dataset("fmnist-lt", **args)


@pytest.fixture
def fake_cifar(tmp_path):
    """100 classes x 6 train images (labels interleaved), 100 x 1 test, CIFAR pickle layout."""
    rng = np.random.RandomState(2)
    folder = tmp_path / "cifar" / "cifar-100-python"
    folder.mkdir(parents=True)
    ytr = rng.permutation(np.repeat(np.arange(100), 6))
    xtr = rng.randint(0, 256, size=(600, 3072)).astype(np.uint8)
    yte = np.arange(100)
    xte = rng.randint(0, 256, size=(100, 3072)).astype(np.uint8)
    for name, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        blob = pickle.dumps({b"data": x, b"fine_labels": [int(v) for v in y],
                             b"filenames": [b"f"] * len(y)}, protocol=2 if name == "train" else 4)
        if name == "train":  # like the official (Python 2 era) files: numpy 1.x module path
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (folder / name).write_bytes(blob)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)
    return folder.parent, xtr, ytr.astype(np.int64)


def cifar_small(root, **kw):
    args = dict(root=root, n_max=4, imbalance_factor=4.0, val_per_class=2, seed=0)
    args.update(kw)
    return build_dataset("cifar100-lt", **args)


@pytest.fixture
def png_dataset(tmp_path):
    """Tiny PNG fixtures: 3 classes, images of several sizes, list files with a blank line."""
    root = tmp_path / "imgs"
    rng = np.random.RandomState(3)
    sizes = [(40, 30), (25, 50), (32, 32), (60, 20)]
    lines = {"train": [], "val": [], "test": []}
    k = 0
    for split, per_class in (("train", [4, 3, 2]), ("val", [1, 1, 1]), ("test", [1, 1, 2])):
        for c, n in enumerate(per_class):
            for _ in range(n):
                w, h = sizes[k % len(sizes)]
                rel = f"c{c}/{split}_{k}.png"
                (root / f"c{c}").mkdir(parents=True, exist_ok=True)
                mode = "L" if k % 3 == 0 else "RGB"  # grey files must come out RGB too
                shape = (h, w) if mode == "L" else (h, w, 3)
                Image.fromarray(rng.randint(0, 256, size=shape).astype(np.uint8), mode).save(
                    root / rel)
                lines[split].append(f"{rel} {c}")
                k += 1
    lines["train"].insert(2, "")  # blank line: skipped, but counts for the line index
    files = {}
    for split, ls in lines.items():
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_text("\n".join(ls) + "\n")
    return root, files


def build_list(root, files, **kw):
    args = dict(image_root=root, train_list=files["train"], val_list=files["val"],
                test_list=files["test"], image_size=16)
    args.update(kw)
    return build_dataset("list", **args)


# --------------------------------------------------------------------------- profiles


def test_lt_profile_fmnist_exact():
    assert lt_profile(10, 500, 100) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


@pytest.mark.parametrize("imbalance_factor,total", [(10, 19573), (50, 12608), (100, 10847),
                                                    (200, 9502)])
def test_lt_profile_cifar100_totals(imbalance_factor, total):
    counts = lt_profile(100, 500, imbalance_factor)
    assert sum(counts) == total
    assert counts[0] == 500 and counts[-1] == 500 // imbalance_factor
    assert all(a >= b for a, b in zip(counts, counts[1:]))


def test_lt_profile_edges():
    assert lt_profile(5, 7, 1.0) == [7] * 5
    assert lt_profile(1, 9, 100) == [9]
    with pytest.raises(ValueError):
        lt_profile(10, 500, 0.5)
    for args, msg in [((10, 500, 0.5), r"--imbalance-factor must be a number in \[1, inf\), got 0.5"),
                      ((10, 500, float("nan")), "--imbalance-factor must be a number in .* got nan"),
                      ((10, 0, 10), "--n-max must be an integer >= 1, got 0"),
                      ((10, 50.5, 10), "--n-max must be an integer >= 1, got 50.5"),
                      ((0, 500, 10), "--num-classes must be an integer >= 1, got 0")]:
        with pytest.raises(UsageError, match=msg):
            lt_profile(*args)


def test_lt_profile_refuses_empty_classes(fake_fmnist):
    # int(30 / 1000 ** (i / 9)) is 0 from class 5 on: [30, 13, 6, 3, 1, 0, 0, 0, 0, 0]
    with pytest.raises(UsageError) as e:
        lt_profile(10, 30, 1000)
    msg = str(e.value)
    assert "classes 5..9" in msg and "--imbalance-factor" in msg and "--n-max" in msg
    assert lt_profile(10, 30, 10)[-1] == 3  # a profile with every class non-empty still builds
    with pytest.raises(UsageError, match="0 training images"):
        fmnist_small(fake_fmnist[0], n_max=30, imbalance_factor=1000.0)


def test_data_errors_are_usage_errors():
    # the command-line tools print a UsageError's message without a traceback
    assert issubclass(DatasetNotFoundError, UsageError)
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(DatasetCorruptError, UsageError)
    assert issubclass(DatasetCorruptError, ValueError)
    assert issubclass(ListFileError, UsageError) and issubclass(ListFileError, ValueError)
    assert str(DatasetNotFoundError("where it is")) == "where it is"


@pytest.mark.parametrize("val_per_class", [0, -1])
def test_val_per_class_must_be_positive(fake_fmnist, fake_cifar, png_dataset, val_per_class):
    # 0 gave an empty val split; a negative value moved training images to val (negative slicing)
    with pytest.raises(UsageError, match=f"--val-per-class must be an integer >= 1, got {val_per_class}$"):
        fmnist_small(fake_fmnist[0], val_per_class=val_per_class)
    with pytest.raises(UsageError, match=f"--val-per-class must be an integer >= 1, got {val_per_class}$"):
        cifar_small(fake_cifar[0], val_per_class=val_per_class)
    root, files = png_dataset
    with pytest.raises(UsageError, match=f"--val-per-class must be an integer >= 1, got {val_per_class}$"):
        build_list(root, files, val_list=None, val_per_class=val_per_class)


def test_registry():
    assert list(DATASETS)[0] == "fmnist-lt"
    assert {"fmnist-lt", "cifar100-lt", "list"} <= set(DATASETS)
    with pytest.raises(ValueError, match="fmnist-lt"):
        build_dataset("mnist-lt")


# --------------------------------------------------------------------------- fmnist-lt


def test_fmnist_profile_splits_and_rows(fake_fmnist):
    root, xtr, ytr = fake_fmnist
    ds = fmnist_small(root)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("fmnist-lt", 10, 1, 28)
    assert ds.class_counts.dtype == np.int64
    assert ds.class_counts.tolist() == lt_profile(10, 20, 10.0)
    assert np.bincount(ds.val.labels, minlength=10).tolist() == [5] * 10
    assert len(ds.test) == 30 and ds.test.index.tolist() == list(range(30))
    assert not set(ds.train.index) & set(ds.val.index)
    for split in (ds.train, ds.val):
        assert split.labels.dtype == np.int64 and split.index.dtype == np.int64
        np.testing.assert_array_equal(split.labels, ytr[split.index])
        np.testing.assert_array_equal(split.images[:, 0].numpy(), xtr[split.index])
    assert set(ds.indices) == {"train", "val", "test"}
    line = ds.describe()
    assert "fmnist-lt" in line and str(lt_profile(10, 20, 10.0)) in line and "\n" not in line


def test_fmnist_subset_depends_on_seed_only(fake_fmnist):
    root = fake_fmnist[0]
    state = np.random.get_state()
    a, b, c = fmnist_small(root, seed=0), fmnist_small(root, seed=0), fmnist_small(root, seed=1)
    assert np.array_equal(a.train.index, b.train.index)
    assert np.array_equal(a.val.index, b.val.index)
    assert not np.array_equal(a.train.index, c.train.index)
    assert np.array_equal(a.class_counts, c.class_counts)
    after = np.random.get_state()
    assert np.array_equal(state[1], after[1]) and state[2] == after[2]  # global RNG untouched


def test_fmnist_root_from_env(fake_fmnist, monkeypatch, tmp_path):
    root = fake_fmnist[0]
    monkeypatch.setenv("GLAG_DATA_ROOT", str(root))
    assert len(build_dataset("fmnist-lt", n_max=20, imbalance_factor=10.0,
                             val_per_class=5).train) > 0
    monkeypatch.setenv("GLAG_DATA_ROOT", str(tmp_path / "nowhere"))
    assert fmnist_small(root).config["root"] == str(root)  # the argument wins over the env


def test_fmnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.delenv("GLAG_DATA_ROOT", raising=False)
    missing = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset("fmnist-lt", root=missing)
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    for needle in ("apt-get update && apt-get install -y dataset-fashion-mnist", str(missing),
                   "--data-root", "GLAG_DATA_ROOT", *FMNIST_FILES.values()):
        assert needle in msg


def test_fmnist_corrupt_files(fake_fmnist):
    root = fake_fmnist[0]
    path = root / FMNIST_FILES["train_labels"]
    write_idx(path, np.zeros((5, 2), np.uint8))  # 2-D labels: wrong magic
    with pytest.raises(DatasetCorruptError, match="magic"):
        fmnist_small(root)
    path.write_bytes(gzip.compress(struct.pack(">II", 0x0801, 400) + b"\0" * 10))
    with pytest.raises(DatasetCorruptError, match="truncated"):
        fmnist_small(root)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetCorruptError, match=str(path.name)):
        fmnist_small(root)


def test_fmnist_damaged_deflate_stream(fake_fmnist):
    root = fake_fmnist[0]
    path = root / FMNIST_FILES["train_labels"]
    blob = bytearray(gzip.compress(gzip.decompress(path.read_bytes())))  # no file name field
    blob[10] = 0x07  # first deflate block: BTYPE 11 (reserved), which zlib rejects
    path.write_bytes(bytes(blob))
    with pytest.raises(DatasetCorruptError) as e:
        fmnist_small(root)
    assert path.name in str(e.value) and "re-install or re-download" in str(e.value)


def test_fmnist_too_few_images(fake_fmnist):
    with pytest.raises(ValueError, match="class 0 has 40 images"):
        fmnist_small(fake_fmnist[0], n_max=40, val_per_class=5)


def test_fmnist_load_batch(fake_fmnist):
    root, xtr, _ = fake_fmnist
    ds = fmnist_small(root)
    ids = np.arange(6, dtype=np.int64)
    x = ds.train.load_batch(ids, augment=False, seed=0)
    assert x.dtype == torch.float32 and x.shape == (6, 1, 28, 28)
    ref = (torch.from_numpy(xtr[ds.train.index[:6]]).float()[:, None] / 255 - T.FMNIST_MEAN[0])
    torch.testing.assert_close(x, ref / T.FMNIST_STD[0])
    a1 = ds.train.load_batch(ids, augment=True, seed=5)
    a2 = ds.train.load_batch(ids, augment=True, seed=5)
    a3 = ds.train.load_batch(ids, augment=True, seed=6)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3) and not torch.equal(a1, x)
    # zero padding shows up as the normalised value of black
    assert torch.isclose(a1, torch.tensor(-T.FMNIST_MEAN[0] / T.FMNIST_STD[0])).any()


# --------------------------------------------------------------------------- transforms


def test_crop_flip_matches_naive():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 7, 9), generator=g, dtype=torch.uint8)
    pad = 2
    oy, ox = torch.tensor([0, 4, 2, 1, 3]), torch.tensor([4, 0, 2, 3, 1])
    flip = torch.tensor([True, False, False, True, True])
    out = T.crop_flip(x, pad, oy, ox, flip)
    for b in range(5):
        xp = torch.zeros(3, 7 + 2 * pad, 9 + 2 * pad, dtype=torch.uint8)
        xp[:, pad:pad + 7, pad:pad + 9] = x[b]
        ref = xp[:, oy[b]:oy[b] + 7, ox[b]:ox[b] + 9]
        assert torch.equal(out[b], ref.flip(-1) if flip[b] else ref)
    same = T.crop_flip(x, pad, torch.full((5,), pad), torch.full((5,), pad),
                       torch.zeros(5, dtype=torch.bool))
    assert torch.equal(same, x)


def test_pil_transforms_geometry():
    rng = np.random.default_rng(0)
    for _ in range(200):
        l, t, r, b = T.random_resized_crop_box(50, 20, rng)
        assert 0 <= l < r <= 50 and 0 <= t < b <= 20
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    assert T.resize_shorter(img, 18).size == (36, 18)
    out = T.eval_transform_pil(img, 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert out[:, 8, 8].tolist() == [10, 20, 30]


# --------------------------------------------------------------------------- iterate_batches


def test_iterate_batches_shapes_order_determinism(fake_fmnist):
    ds = fmnist_small(fake_fmnist[0])
    n = len(ds.train)
    assert num_batches(ds.train, 16) == -(-n // 16)
    batches = list(iterate_batches(ds.train, 16, shuffle=True, augment=True, seed=3, epoch=2))
    assert len(batches) == num_batches(ds.train, 16)
    x, y, idx = batches[0]
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and idx.dtype == torch.int64
    seen = torch.cat([b[2] for b in batches]).numpy()
    assert sorted(seen.tolist()) == sorted(ds.train.index.tolist())  # each row once
    pos = {int(s): r for r, s in enumerate(ds.train.index)}
    for _, yb, ib in batches:
        assert yb.tolist() == [int(ds.train.labels[pos[int(i)]]) for i in ib]
    again = list(iterate_batches(ds.train, 16, shuffle=True, augment=True, seed=3, epoch=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(batches, again))
    other = next(iterate_batches(ds.train, 16, shuffle=True, augment=True, seed=3, epoch=3))
    assert not torch.equal(other[2], batches[0][2])
    resumed = list(iterate_batches(ds.train, 16, shuffle=True, augment=True, seed=3, epoch=2,
                                   start_batch=3))
    assert len(resumed) == len(batches) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
               for a, b in zip(batches[3:], resumed))


def test_iterate_batches_no_shuffle_and_drop_last(fake_fmnist):
    ds = fmnist_small(fake_fmnist[0])
    plain = list(iterate_batches(ds.train, 16, shuffle=False, augment=False, seed=0))
    np.testing.assert_array_equal(torch.cat([b[2] for b in plain]).numpy(), ds.train.index)
    np.testing.assert_array_equal(torch.cat([b[1] for b in plain]).numpy(), ds.train.labels)
    torch.testing.assert_close(plain[1][0], ds.train.load_batch(np.arange(16, 32), False, 0))
    aug = list(iterate_batches(ds.train, 16, shuffle=False, augment=True, seed=0))
    assert not torch.equal(aug[0][0], plain[0][0])
    dropped = list(iterate_batches(ds.train, 16, shuffle=True, augment=False, seed=0,
                                   drop_last=True))
    assert len(dropped) == len(ds.train) // 16 and all(len(b[0]) == 16 for b in dropped)


# --------------------------------------------------------------------------- cifar100-lt


def ldam_drw_naive(targets, img_max, imb_factor, cls_num=100):
    """IMBALANCECIFAR100 of LDAM-DRW, literally: global np.random.seed(0) and shuffles."""
    img_num_per_cls = [int(img_max * (imb_factor ** (i / (cls_num - 1.0)))) for i in range(cls_num)]
    state = np.random.get_state()
    try:
        np.random.seed(0)
        targets_np = np.array(targets, dtype=np.int64)
        selected = []
        for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            selected.append(idx[:the_img_num])
    finally:
        np.random.set_state(state)
    return np.concatenate(selected)


def test_cifar_matches_ldam_drw(fake_cifar):
    root, xtr, ytr = fake_cifar
    state = np.random.get_state()
    ds = cifar_small(root)
    after = np.random.get_state()
    assert np.array_equal(state[1], after[1]) and state[2] == after[2]  # global RNG untouched
    np.testing.assert_array_equal(ds.train.index, ldam_drw_naive(ytr, 4, 1 / 4.0))
    assert ds.class_counts.tolist() == lt_profile(100, 4, 4.0)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (100, 3, 32)
    np.testing.assert_array_equal(ds.train.labels, ytr[ds.train.index])
    np.testing.assert_array_equal(ds.train.images.reshape(len(ds.train), -1).numpy(),
                                  xtr[ds.train.index])
    # the LT subset ignores `seed`; the validation split does not
    other = cifar_small(root, seed=1)
    np.testing.assert_array_equal(other.train.index, ds.train.index)
    assert not np.array_equal(other.val.index, ds.val.index)
    assert ds.class_names[:2] == ["c0", "c1"]
    x = ds.test.load_batch(np.arange(4), augment=True, seed=0)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_val_from_leftovers(fake_cifar, caplog):
    root = fake_cifar[0]
    ds = cifar_small(root)
    assert not set(ds.train.index) & set(ds.val.index)
    assert np.bincount(ds.val.labels, minlength=100).tolist() == [2] * 100
    with caplog.at_level(logging.WARNING, logger="glag.data.cifar"):
        full = cifar_small(root, n_max=6, imbalance_factor=2.0)  # class 0 keeps all 6 images
    val_counts = np.bincount(full.val.labels, minlength=100)
    assert val_counts[0] == 0 and (val_counts[full.class_counts <= 4] == 2).all()
    assert "fewer val images" in caplog.text and "0:0" in caplog.text
    # root may also be the cifar-100-python folder itself
    assert np.array_equal(cifar_small(root / "cifar-100-python").train.index, ds.train.index)


def test_cifar_refuses_foreign_pickle(fake_cifar):
    root = fake_cifar[0]
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"x": print}))
    with pytest.raises(DatasetCorruptError, match="builtins.print"):
        cifar_small(root)


def _damage_encoding_name(folder):
    blob = (folder / "train").read_bytes()
    i = blob.index(b"latin1")
    (folder / "train").write_bytes(blob[:i + 3] + b"X" + blob[i + 4:])  # LookupError: latXn1


def _latin1_class_name(folder):
    names = [b"caf\xe9"] + [f"c{i}".encode() for i in range(1, 100)]
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}, protocol=2))


def _damage_frame_length(folder):
    blob = pickle.dumps({b"data": np.zeros((100, 3072), np.uint8),
                         b"fine_labels": list(range(100))}, protocol=4)
    (folder / "test").write_bytes(blob[:7] + b"\x7f" + blob[8:])  # FRAME of ~545 GB


@pytest.mark.parametrize("damage", [_damage_encoding_name, _latin1_class_name,
                                    _damage_frame_length])
def test_cifar_damaged_pickles(fake_cifar, damage):
    root = fake_cifar[0]
    damage(root / "cifar-100-python")
    with pytest.raises(DatasetCorruptError, match="cifar-100-python"):
        cifar_small(root)


def test_cifar_protocol5_pickles(fake_cifar):
    root, xtr, _ = fake_cifar
    ref = cifar_small(root)
    folder = root / "cifar-100-python"
    for name in ("train", "test", "meta"):
        with open(folder / name, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
        (folder / name).write_bytes(pickle.dumps(obj, protocol=5))  # numpy: _frombuffer
    ds = cifar_small(root)
    np.testing.assert_array_equal(ds.train.index, ref.train.index)
    np.testing.assert_array_equal(ds.train.images.reshape(len(ds.train), -1).numpy(),
                                  xtr[ds.train.index])


def test_cifar_missing_message(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        build_dataset("cifar100-lt", root=tmp_path)
    msg = str(e.value)
    for needle in ("cifar-100-python/train", "meta", "download=True", "GLAG_DATA_ROOT"):
        assert needle in msg


# --------------------------------------------------------------------------- list datasets


def test_list_dataset_basics(png_dataset):
    root, files = png_dataset
    ds = build_list(root, files)
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("list", 3, 3, 16)
    assert ds.class_counts.tolist() == [4, 3, 2]
    assert (len(ds.val), len(ds.test)) == (3, 4)
    assert ds.train.index.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]  # line 2 is blank
    x = ds.train.load_batch(np.arange(len(ds.train)), augment=False, seed=0)
    assert x.shape == (9, 3, 16, 16) and x.dtype == torch.float32
    a1 = ds.train.load_batch(np.arange(4), augment=True, seed=1)
    assert torch.equal(a1, ds.train.load_batch(np.arange(4), augment=True, seed=1))
    assert not torch.equal(a1, ds.train.load_batch(np.arange(4), augment=True, seed=2))


def test_list_iterate_with_workers(png_dataset):
    root, files = png_dataset
    ds = build_list(root, files)
    kw = dict(shuffle=True, augment=True, seed=4, epoch=1)
    ref = list(iterate_batches(ds.train, 4, **kw))
    par = list(iterate_batches(ds.train, 4, num_workers=1, **kw))
    assert len(ref) == len(par) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(ref, par))
    tail = list(iterate_batches(ds.train, 4, start_batch=2, **kw))
    assert torch.equal(tail[0][0], ref[2][0])


def test_list_val_carved_from_train(png_dataset):
    root, files = png_dataset
    ds = build_list(root, files, val_list=None, val_per_class=1, seed=0)
    assert ds.class_counts.tolist() == [3, 2, 1]
    assert np.bincount(ds.val.labels, minlength=3).tolist() == [1, 1, 1]
    assert not set(ds.train.index) & set(ds.val.index)
    with pytest.raises(ValueError, match="class 2"):
        build_list(root, files, val_list=None, val_per_class=2)


def test_list_bad_line(png_dataset, tmp_path):
    root, files = png_dataset
    bad = tmp_path / "bad.txt"
    bad.write_text("c0/train_0.png 0\n\nc0/with space.png 1\n")
    with pytest.raises(ListFileError, match=r"bad\.txt, line 3"):
        build_list(root, files, train_list=bad)
    bad.write_text("c0/train_0.png zero\n")
    with pytest.raises(ListFileError, match="line 1"):
        build_list(root, files, train_list=bad)


def test_list_missing_images(png_dataset, tmp_path):
    root, files = png_dataset
    lst = tmp_path / "missing.txt"
    lst.write_text("c0/train_0.png 0\n" + "".join(f"gone/{i}.png 1\n" for i in range(8)))
    with pytest.raises(DatasetNotFoundError) as e:
        build_list(root, files, train_list=lst)
    msg = str(e.value)
    assert "8 of 9" in msg and "gone/0.png" in msg and "gone/7.png" not in msg


def test_list_damaged_images(png_dataset):
    root, files = png_dataset
    ds = build_list(root, files)
    row = 3  # line 5 of train.txt (line 3 is blank)
    path = Path(ds.train.paths[row])
    good = path.read_bytes()
    for damaged in (good[:len(good) // 2], b""):  # truncated; zero bytes
        path.write_bytes(damaged)
        with pytest.raises(DatasetCorruptError) as e:
            ds.train.load_batch(np.arange(len(ds.train)), augment=False, seed=0)
        msg = str(e.value)
        assert str(path) in msg and f"{files['train']}, line 5" in msg
        assert "replace" in msg and "remove" in msg
        with pytest.raises(DatasetCorruptError, match=path.name):
            list(iterate_batches(ds.train, 4, shuffle=True, augment=True, seed=0))
    path.write_bytes(good)
    assert ds.train.load_batch(np.array([row]), augment=False, seed=0).shape == (1, 3, 16, 16)


def test_list_16bit_grey_images(png_dataset, tmp_path):
    root, files = png_dataset
    ramp = np.rint(np.linspace(0, 65535, 20 * 24)).reshape(20, 24)
    Image.fromarray(ramp.astype(np.uint16)).save(root / "grey16.png")  # mode I;16
    Image.fromarray(np.rint(ramp / 257).astype(np.uint8), "L").save(root / "grey8.png")
    Image.fromarray(ramp.astype(np.int32)).save(root / "grey32.tif")  # mode I
    with Image.open(root / "grey16.png") as im16, Image.open(root / "grey32.tif") as im32:
        assert (im16.mode, im32.mode) == ("I;16", "I")
    lst = tmp_path / "grey.txt"
    lst.write_text("grey8.png 0\ngrey16.png 0\ngrey32.tif 0\n")
    ds = build_list(root, files, test_list=lst)
    x = ds.test.load_batch(np.arange(3), augment=False, seed=0)
    assert x[0].max() > x[0].min()  # a ramp, not all white
    torch.testing.assert_close(x[1], x[0])  # 16-bit values scaled by 257, like the 8-bit file
    torch.testing.assert_close(x[2], x[0])
    Image.fromarray(np.full((20, 24), 70000, np.int32)).save(root / "grey32.tif")
    with pytest.raises(DatasetCorruptError, match="grey32.tif"):
        ds.test.load_batch(np.array([2]), augment=False, seed=0)


def test_list_float_grey_images(png_dataset, tmp_path):
    """Float TIFFs (mode F): values in [0, 1] are intensities (times 255), values up to 255 are
    0..255, like the 8-bit file; other ranges and NaN are refused, naming the file and the fix."""
    root, files = png_dataset
    ramp8 = np.rint(np.linspace(0, 255, 20 * 24)).reshape(20, 24)
    Image.fromarray(ramp8.astype(np.uint8), "L").save(root / "grey8.png")
    Image.fromarray((ramp8 / 255).astype(np.float32), "F").save(root / "unit.tif")
    Image.fromarray(ramp8.astype(np.float32), "F").save(root / "byte.tif")
    with Image.open(root / "unit.tif") as im:
        assert im.mode == "F"
    lst = tmp_path / "float.txt"
    lst.write_text("grey8.png 0\nunit.tif 0\nbyte.tif 0\n")
    ds = build_list(root, files, test_list=lst)
    x = ds.test.load_batch(np.arange(3), augment=False, seed=0)
    assert x[0].max() > x[0].min()  # a ramp, not all black
    torch.testing.assert_close(x[1], x[0])
    torch.testing.assert_close(x[2], x[0])
    for bad, what in ((np.full((20, 24), 300.0), "values in 300..300"), (np.full((20, 24), -0.5), "values in -0.5"),
                      (np.full((20, 24), np.nan), "not finite")):
        Image.fromarray(bad.astype(np.float32), "F").save(root / "unit.tif")
        with pytest.raises(DatasetCorruptError, match=f"unit.tif .*line 2. is a float image .*{what}.*rescale"):
            ds.test.load_batch(np.array([1]), augment=False, seed=0)


def test_list_file_encoding(png_dataset, tmp_path):
    root, files = png_dataset
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + files["train"].read_bytes())  # Windows Notepad "UTF-8"
    ds = build_list(root, files, train_list=bom)
    assert ds.train.paths[0] == str(root / "c0/train_0.png") and ds.train.index[0] == 0
    latin = tmp_path / "latin.txt"
    latin.write_bytes(files["train"].read_bytes() + "c0/caf\u00e9.png 0\n".encode("latin-1"))
    with pytest.raises(ListFileError) as e:
        build_list(root, files, train_list=latin)
    msg = str(e.value)
    assert "latin.txt, line 11" in msg and "UTF-8" in msg


def test_list_labels_checked_against_train(png_dataset, tmp_path):
    root, files = png_dataset
    val = tmp_path / "val5.txt"  # train labels are 0..2
    val.write_text(files["val"].read_text() + "c0/val_9.png 5\n")
    with pytest.raises(ListFileError, match=r"val5\.txt, line 4: label 5"):
        build_list(root, files, val_list=val)
    with pytest.raises(ListFileError, match=r"val5\.txt, line 4: label 5"):
        build_list(root, files, test_list=val)
    typo = tmp_path / "typo.txt"  # would be 745 GiB of class counts
    typo.write_text(files["train"].read_text() + "c0/train_0.png 99999999999\n")
    with pytest.raises(ListFileError) as e:
        build_list(root, files, train_list=typo)
    assert "typo.txt" in str(e.value) and "99999999999 (line 11)" in str(e.value)
    gap = tmp_path / "gap.txt"  # no training image of class 3
    gap.write_text(files["train"].read_text() + "c0/train_0.png 4\n")
    with pytest.raises(ListFileError, match=r"gap\.txt: 1 of the 5 classes 0\.\.4 have no "
                                            r"training image \(class ids 3\)"):
        build_list(root, files, train_list=gap)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ListFileError, match=r"empty\.txt.*no training images"):
        build_list(root, files, train_list=empty)
    ds = build_list(root, files, test_list=files["val"])  # test may hold a subset of classes
    assert ds.num_classes == 3


def test_list_bad_line_quoted_short(png_dataset, tmp_path):
    root, files = png_dataset
    annotations = {"images": [{"id": i, "file_name": f"train_val2018/Plantae/{i}/{i:032x}.jpg"}
                              for i in range(2000)],
                   "annotations": [{"id": i, "image_id": i, "category_id": i} for i in range(2000)]}
    for name, text in (("train2018.json", json.dumps(annotations)),
                       ("pretty.json", json.dumps(annotations, indent=2))):
        (tmp_path / name).write_text(text)
        with pytest.raises(ListFileError) as e:
            build_list(root, files, train_list=tmp_path / name)
        msg = str(e.value)
        assert len(msg) < 500 and name in msg and "JSON" in msg and "relative/path label" in msg
    long_line = tmp_path / "long.txt"
    long_line.write_text("c0/train_0.png 0\n" + " ".join(["x"] * 10000) + "\n")
    with pytest.raises(ListFileError, match="line 2") as e:
        build_list(root, files, train_list=long_line)
    assert len(str(e.value)) < 500 and "JSON" not in str(e.value)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not all((Path(FMNIST_DEFAULT_ROOT) / f).is_file()
                            for f in FMNIST_FILES.values()),
                    reason="Debian dataset-fashion-mnist not installed")
def test_real_fmnist_lt_default(monkeypatch):
    monkeypatch.delenv("GLAG_DATA_ROOT", raising=False)
    ds = build_dataset()
    assert ds.class_counts.tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert len(ds.train) == 1236 and len(ds.val) == 200 and len(ds.test) == 10000
    assert np.bincount(ds.val.labels, minlength=10).tolist() == [20] * 10
