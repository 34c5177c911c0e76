"""The image-folder dataset (``build_dataset("folder", root=...)``) on generated PNG/JPEG trees."""
import numpy as np
import pytest
import torch
from PIL import Image

from glag.data import (DATASETS, DatasetCorruptError, DatasetNotFoundError, build_dataset,
                       iterate_batches)
from glag.errors import UsageError
from glag.stage1 import Stage1Config, dataset_from_config

# class -> images per split; "b_cat" sorts before "dog", "ant" first: ids 0, 1, 2
TREE = {"train": {"dog": 6, "ant": 4, "b_cat": 3}, "val": {"dog": 1, "ant": 1, "b_cat": 1},
        "test": {"dog": 2, "ant": 1, "b_cat": 2}}


def make_tree(root, tree=TREE, seed=0):
    rng = np.random.RandomState(seed)
    for split, classes in tree.items():
        for name, n in classes.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                ext = (".png", ".jpg", ".JPEG")[k % 3]
                arr = rng.randint(0, 256, size=(20 + k, 24, 3)).astype(np.uint8)
                Image.fromarray(arr).save(d / f"img{k:02d}{ext}")
            (d / "notes.txt").write_text("not an image")
            (d / ".hidden.png").write_bytes(b"")
    return root


def test_folder_dataset_basics(tmp_path):
    root = make_tree(tmp_path / "tree")
    ds = build_dataset("folder", root=root, image_size=16)
    assert "folder" in DATASETS
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("folder", 3, 3, 16)
    assert ds.class_names == ["ant", "b_cat", "dog"]
    assert ds.class_counts.tolist() == [4, 3, 6]  # counted from the files, not given
    assert (len(ds.val), len(ds.test)) == (3, 5)
    assert ds.train.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 6
    assert ds.train.index.tolist() == list(range(13))
    assert ds.train.paths[0].endswith("train/ant/img00.png") and ds.train.paths[2].endswith("img02.JPEG")
    x = ds.train.load_batch(np.arange(5), augment=False, seed=0)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    batches = list(iterate_batches(ds.train, 4, shuffle=True, augment=True, seed=1, epoch=0))
    assert sorted(np.concatenate([b[2].numpy() for b in batches]).tolist()) == list(range(13))


def test_folder_val_carved_from_train(tmp_path):
    tree = {k: v for k, v in TREE.items() if k != "val"}
    root = make_tree(tmp_path / "tree", tree)
    ds = build_dataset("folder", root=root, val_per_class=2, seed=3, image_size=16)
    assert ds.class_counts.tolist() == [2, 1, 4]
    assert np.bincount(ds.val.labels, minlength=3).tolist() == [2, 2, 2]
    assert not set(ds.train.index) & set(ds.val.index)
    again = build_dataset("folder", root=root, val_per_class=2, seed=3, image_size=16)
    assert again.val.index.tolist() == ds.val.index.tolist()  # seeded
    with pytest.raises(ValueError, match="b_cat"):
        build_dataset("folder", root=root, val_per_class=3, image_size=16)


def test_folder_damaged_image(tmp_path):
    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "b_cat" / "img01.jpg"
    bad.write_bytes(b"")  # zero bytes: the build only lists files, loading it fails clearly
    ds = build_dataset("folder", root=root, image_size=16)
    with pytest.raises(DatasetCorruptError) as e:
        ds.train.load_batch(np.arange(len(ds.train)), augment=False, seed=0)
    assert str(bad) in str(e.value) and "replace" in str(e.value)


@pytest.mark.parametrize("val_per_class", [0, -2])
def test_folder_val_per_class_must_be_positive(tmp_path, val_per_class):
    root = make_tree(tmp_path / "tree", {k: v for k, v in TREE.items() if k != "val"})
    with pytest.raises(UsageError, match=f"--val-per-class must be an integer >= 1, got {val_per_class}$"):
        build_dataset("folder", root=root, val_per_class=val_per_class, image_size=16)


def test_folder_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("GLAG_DATA_ROOT", raising=False)
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        build_dataset("folder")
    root = make_tree(tmp_path / "tree", {"train": {"a": 2}})
    with pytest.raises(DatasetNotFoundError, match="no test folder"):
        build_dataset("folder", root=root)
    make_tree(root, {"test": {"a": 1, "zebra": 1}})
    with pytest.raises(ValueError, match="zebra"):
        build_dataset("folder", root=root, val_per_class=1)
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        build_dataset("folder", root=tmp_path / "nowhere")


def test_folder_from_stage1_config(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree")
    monkeypatch.setenv("GLAG_DATA_ROOT", str(root))
    cfg = Stage1Config(dataset="folder", image_size=16)
    assert cfg.arch == "resnet10"
    ds = dataset_from_config(cfg)
    assert ds.name == "folder" and ds.class_counts.tolist() == [4, 3, 6]


def test_stage1_refused_on_a_damaged_image_keeps_nothing(tmp_path):
    """A damaged image is met when its batch is first read, after the run folder was written: the
    refused new run used to leave config.json, env.json and indices.npz, so the same command, with
    the image fixed, was refused ("already holds a run"). Nothing is kept now, and it runs."""
    from glag.stage1 import train_stage1

    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "b_cat" / "img01.jpg"
    good = bad.read_bytes()
    bad.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".keep").write_text("")
    for out in (tmp_path / "run", tmp_path / "empty"):
        cfg = Stage1Config(dataset="folder", data_root=str(root), out=str(out), image_size=16, epochs=1,
                           batch_size=4, eval_batch_size=8, progress=False, arch="resnet10")
        with pytest.raises(DatasetCorruptError, match="img01.jpg"):
            train_stage1(cfg)
        assert not (tmp_path / "run").exists() and [p.name for p in (tmp_path / "empty").iterdir()] == [".keep"]
    bad.write_bytes(good)
    # 13 training images in batches of 4: the last batch, of 1 image, cannot train BatchNorm (it
    # raised); it is left out of the epoch
    assert "val" in train_stage1(cfg)
    assert len((tmp_path / "empty" / "summary.csv").read_text().splitlines()) == 2
