"""Tests of the HDF5 feature store (glag.features): round trip, atomicity, resume, reader errors."""
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from glag import __version__
from glag.features import (
    FORMAT_VERSION,
    FeatureFileError,
    FeatureWriter,
    open_features,
    sha256_file,
)

D, C = 8, 5
SIZES = {"train": 50, "val": 20, "test": 15}
ATTRS = {"backbone": "resnet32", "checkpoint_sha256": "ab" * 32, "dataset": "toy_lt"}


def make_data(sizes=SIZES, d=D, c=C, seed=0):
    """Synthetic splits: {split: (features f32 [N,d], labels i64 [N], index i64 [N], logits f32 [N,C])}."""
    rng = np.random.RandomState(seed)
    out = {}
    for split, n in sizes.items():
        out[split] = (
            rng.randn(n, d).astype(np.float32) * 3,
            rng.randint(0, c, size=n).astype(np.int64),
            rng.permutation(10 * n)[:n].astype(np.int64),
            rng.randn(n, c).astype(np.float32),
        )
    return out


def write_all(path, data, batch=7, with_logits=True, **kw):
    kw = {"split_sizes": {s: len(v[1]) for s, v in data.items()}, "feature_dim": D, "num_classes": C,
          "attrs": ATTRS, **kw}
    with FeatureWriter(path, with_logits=with_logits, **kw) as w:
        for split, (f, y, i, lg) in data.items():
            for a in range(w.rows_done(split), len(y), batch):
                w.append(split, f[a:a + batch], y[a:a + batch], i[a:a + batch],
                         lg[a:a + batch] if with_logits else None)
        return w.finalize()


def assert_same_file(p, q):
    with h5py.File(p, "r") as f, h5py.File(q, "r") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        for split in f:
            assert sorted(f[split].keys()) == sorted(g[split].keys())
            for name in f[split]:
                np.testing.assert_array_equal(f[split][name][...], g[split][name][...])
        for key in ("num_classes", "feature_dim", "class_counts", "complete", "format_version"):
            np.testing.assert_array_equal(f.attrs[key], g.attrs[key])


@pytest.fixture
def data():
    return make_data()


@pytest.fixture
def good_file(tmp_path, data):
    return write_all(tmp_path / "feats.h5", data, chunk_rows=16)


# -- round trip and schema ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_round_trip(tmp_path, data, dtype):
    path = write_all(tmp_path / "feats.h5", data, dtype=dtype, chunk_rows=16)
    with open_features(path) as ff:
        assert ff.splits == ["train", "val", "test"]
        assert (ff.num_classes, ff.feature_dim) == (C, D)
        np.testing.assert_array_equal(ff.class_counts, np.bincount(data["train"][1], minlength=C))
        assert ff.class_counts.dtype == np.int64
        assert ff.attrs["created_by"] == f"glag {__version__}"
        for split, (f, y, i, lg) in data.items():
            s = ff.load(split)
            assert s.features.dtype == np.float32 and s.logits.dtype == np.float32
            np.testing.assert_array_equal(s.features, f.astype(dtype).astype(np.float32))
            np.testing.assert_array_equal(s.labels, y)
            np.testing.assert_array_equal(s.index, i)
            np.testing.assert_array_equal(s.logits, lg)
            assert ff.has_logits(split) and ff.nbytes(split) == len(y) * D * 4
            # slices and streaming give the same rows
            part = ff.load(split, rows=slice(3, 17, 2))
            np.testing.assert_array_equal(part.features, s.features[3:17:2])
            np.testing.assert_array_equal(part.index, i[3:17:2])
            chunks = list(ff.iter_chunks(split, 6))
            assert [c.start for c in chunks] == list(range(0, len(y), 6))
            np.testing.assert_array_equal(np.concatenate([c.features for c in chunks]), s.features)
            np.testing.assert_array_equal(np.concatenate([c.logits for c in chunks]), s.logits)


def test_plain_h5py_schema(good_file, data):
    with h5py.File(good_file, "r") as f:
        assert sorted(f.keys()) == ["test", "train", "val"]
        assert set(f.attrs.keys()) == {"format_version", "num_classes", "feature_dim", "class_counts",
                                       "backbone", "checkpoint_sha256", "dataset", "created_by", "complete"}
        assert f.attrs["format_version"] == FORMAT_VERSION and bool(f.attrs["complete"])
        assert f.attrs["class_counts"].dtype == np.int64
        for split, n in SIZES.items():
            g = f[split]
            assert sorted(g.keys()) == ["features", "index", "labels", "logits"]
            assert g["features"].shape == (n, D) and g["features"].dtype == np.float32
            assert g["features"].chunks == (min(16, n), D)
            assert g["labels"].dtype == np.int64 and g["index"].dtype == np.int64
            assert g["logits"].shape == (n, C) and g["logits"].dtype == np.float32
            assert g.attrs["rows_done"] == n


def test_write_validation(tmp_path, data):
    f, y, i, lg = data["train"]
    with FeatureWriter(tmp_path / "x.h5", split_sizes={"train": 10}, feature_dim=D, num_classes=C,
                       attrs=ATTRS) as w:
        bad = f[:4].copy()
        bad[2, 1] = np.nan
        with pytest.raises(FeatureFileError, match=r"'train' row 2.*NaN"):
            w.append("train", bad, y[:4], i[:4], lg[:4])
        with pytest.raises(ValueError, match="features must be"):
            w.append("train", f[:4, :3], y[:4], i[:4], lg[:4])
        with pytest.raises(ValueError, match="logits are required"):
            w.append("train", f[:4], y[:4], i[:4])
        with pytest.raises(FeatureFileError, match="outside"):
            w.append("train", f[:4], y[:4] + C, i[:4], lg[:4])
        assert w.rows_done("train") == 0
        w.append("train", f[:8], y[:8], i[:8], lg[:8])
        with pytest.raises(FeatureFileError, match="overflows"):
            w.append("train", f[:4], y[:4], i[:4], lg[:4])
        with pytest.raises(FeatureFileError, match="not full"):
            w.finalize()
    with FeatureWriter(tmp_path / "y.h5", split_sizes={"train": 2}, feature_dim=D, num_classes=C,
                       attrs=ATTRS, dtype="float16") as w:
        with pytest.raises(FeatureFileError, match="float16 range"):
            w.append("train", np.full((2, D), 1e5, np.float32), y[:2], i[:2], lg[:2])
    # float64 beyond float32's range would be stored as inf: refused, the file left unreadable never
    with FeatureWriter(tmp_path / "z.h5", split_sizes={"train": 2}, feature_dim=D, num_classes=C,
                       attrs=ATTRS) as w:
        with pytest.raises(FeatureFileError, match=r"row 1: feature magnitude 1e\+39 exceeds the float32 range"):
            w.append("train", np.array([[1.0] * D, [1e39] * D]), y[:2], i[:2], lg[:2])
        with pytest.raises(FeatureFileError, match=r"row 0: logits are NaN or inf \(in float32"):
            w.append("train", f[:2], y[:2], i[:2], np.full((2, C), -1e39))
        assert w.rows_done("train") == 0


def test_reader_checks_values_after_the_cast(tmp_path, data):
    """A float64 dataset beyond float32, or float16 asked for on large float32 values, is refused
    on load (naming the row and the fix) instead of handing back inf."""
    f, y, i, lg = (a[:6] for a in data["train"])
    f = f.copy()
    f[3, 1] = 1e5  # fine in float32, beyond float16
    p = tmp_path / "f.h5"
    write_all(p, {"train": (f, y, i, lg)})
    wide = f.astype(np.float64)
    wide[4, 2] = 1e39
    with h5py.File(p, "r+") as h:
        del h["train/features"]
        h["train"].create_dataset("features", data=wide)
    with open_features(p) as ff:
        with pytest.raises(FeatureFileError, match=r"row 4: feature magnitude 1e\+39 exceeds the range of float32.*"
                                                   r"re-extract"):
            ff.load("train")
        np.testing.assert_array_equal(ff.load("train", rows=slice(0, 4)).features, f[:4])
        with pytest.raises(FeatureFileError, match=r"row 3: feature magnitude 1e\+05 exceeds the range of "
                                                   r"float16.*Load it as float32"):
            ff.load("train", rows=slice(0, 4), dtype=np.float16)
        np.testing.assert_array_equal(ff.load("train", rows=slice(0, 3), dtype=np.float16).features,
                                      f[:3].astype(np.float16))


def test_torch_tensors_accepted(tmp_path, data):
    torch = pytest.importorskip("torch")
    f, y, i, lg = data["train"]
    with FeatureWriter(tmp_path / "t.h5", split_sizes={"train": 50}, feature_dim=D, num_classes=C,
                       attrs=ATTRS) as w:
        w.append("train", torch.from_numpy(f), torch.from_numpy(y), torch.from_numpy(i), torch.from_numpy(lg))
        path = w.finalize()
    with open_features(path) as ff:
        np.testing.assert_array_equal(ff.load("train").features, f)


# -- atomicity, overwrite -------------------------------------------------------------------


def test_atomic_rename(tmp_path, data):
    path = tmp_path / "feats.h5"
    partial = tmp_path / "feats.h5.partial"
    f, y, i, lg = data["train"]
    w = FeatureWriter(path, split_sizes={"train": 50}, feature_dim=D, num_classes=C, attrs=ATTRS)
    w.append("train", f[:30], y[:30], i[:30], lg[:30])
    assert partial.exists() and not path.exists()
    with pytest.raises(FeatureFileError, match="interrupted"):
        open_features(path)
    with pytest.raises(FeatureFileError, match="unfinished"):
        open_features(partial)
    w.append("train", f[30:], y[30:], i[30:], lg[30:])
    assert not path.exists()
    assert w.finalize() == path
    assert path.exists() and not partial.exists()


def test_skeletons_of_killed_writers_are_removed(tmp_path, data):
    """A writer killed while laying out a new file leaves its skeleton (``.<name>.partial.<host>.
    <pid>.init``); the next writer of that file removes it if its process is gone from this host,
    and leaves a live process's and another host's alone."""
    import platform

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = platform.node() or "host"
    name = ".feats.h5.partial"
    left = {"dead": tmp_path / f"{name}.{host}.{dead.pid}.init",
            "alive": tmp_path / f"{name}.{host}.{os.getppid()}.init",
            "elsewhere": tmp_path / f"{name}.other-host.{dead.pid}.init"}
    for p in left.values():
        p.write_bytes(b"half a skeleton")
    write_all(tmp_path / "feats.h5", data)
    assert not left["dead"].exists() and left["alive"].exists() and left["elsewhere"].exists()
    kept = ["feats.h5", left["alive"].name, left["elsewhere"].name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_existing_file_not_overwritten(good_file, data):
    before = sha256_file(good_file)
    with pytest.raises(FeatureFileError, match="overwrite=True"):
        FeatureWriter(good_file, split_sizes=SIZES, feature_dim=D, num_classes=C, attrs=ATTRS)
    assert sha256_file(good_file) == before
    # with overwrite=True the old file survives until the new one is complete
    new = make_data(seed=1)
    w = FeatureWriter(good_file, split_sizes=SIZES, feature_dim=D, num_classes=C, attrs=ATTRS, overwrite=True)
    assert sha256_file(good_file) == before
    w.close()
    write_all(good_file, new, overwrite=True)
    with open_features(good_file) as ff:
        np.testing.assert_array_equal(ff.load("val").features, new["val"][0])


# -- resume ---------------------------------------------------------------------------------


def test_resume_matches_one_shot(tmp_path, data):
    ref = write_all(tmp_path / "ref.h5", data, chunk_rows=16)
    path = tmp_path / "feats.h5"
    kw = dict(split_sizes=SIZES, feature_dim=D, num_classes=C, attrs=ATTRS, chunk_rows=16)
    with pytest.raises(RuntimeError, match="simulated crash"):
        with FeatureWriter(path, **kw) as w:
            for split, n in (("train", 50), ("val", 9)):
                f, y, i, lg = data[split]
                w.append(split, f[:n], y[:n], i[:n], lg[:n])
            raise RuntimeError("simulated crash")
    assert not path.exists() and (tmp_path / "feats.h5.partial").exists()
    # mismatched identity -> refuse, leave the .partial alone
    for bad in ({"attrs": {**ATTRS, "checkpoint_sha256": "cd" * 32}}, {"feature_dim": D + 1},
                {"split_sizes": {**SIZES, "val": 21}}, {"dtype": "float16"}, {"with_logits": False}):
        with pytest.raises(FeatureFileError, match="delete the .partial|Delete the .partial"):
            FeatureWriter(path, **{**kw, **bad})
    w = FeatureWriter(path, **kw)
    assert (w.rows_done("train"), w.rows_done("val"), w.rows_done("test")) == (50, 9, 0)
    w.close()
    write_all(path, data, batch=4, chunk_rows=16)  # resumes from rows_done with another batch size
    assert_same_file(ref, path)


KILL_CHILD = textwrap.dedent("""
    import sys, numpy as np
    from glag.features import FeatureWriter
    path, n, d, c, b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    rng = np.random.RandomState(0)
    f, y = rng.randn(n, d).astype(np.float32), rng.randint(0, c, n)
    lg = rng.randn(n, c).astype(np.float32)
    w = FeatureWriter(path, split_sizes={"train": n}, feature_dim=d, num_classes=c,
                      attrs={"dataset": "kill", "checkpoint_sha256": "00"}, chunk_rows=64)
    for a in range(w.rows_done("train"), n, b):
        w.append("train", f[a:a + b], y[a:a + b], np.arange(a, min(n, a + b)), lg[a:a + b])
        print(a + b, flush=True)
    print("done", flush=True)
""")


def test_sigkill_then_resume(tmp_path):
    n, d, c, b = 20000, 32, 10, 50
    path = tmp_path / "feats.h5"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(path), str(n), str(d), str(c), str(b)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        while len(lines) < 3:
            line = proc.stdout.readline()
            assert line, f"child died early: {proc.stderr.read()}"
            lines.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)  # lands somewhere inside a later append (or a print)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not path.exists()

    rng = np.random.RandomState(0)
    f, y = rng.randn(n, d).astype(np.float32), rng.randint(0, c, n)
    lg = rng.randn(n, c).astype(np.float32)
    with FeatureWriter(path, split_sizes={"train": n}, feature_dim=d, num_classes=c,
                       attrs={"dataset": "kill", "checkpoint_sha256": "00"}, chunk_rows=64) as w:
        done = w.rows_done("train")
        assert done >= 3 * b and done % b == 0  # whole batches only
        for a in range(done, n, 1000):
            w.append("train", f[a:a + 1000], y[a:a + 1000], np.arange(a, min(n, a + 1000)), lg[a:a + 1000])
        w.finalize()
    with open_features(path) as ff:
        s = ff.load("train")
        np.testing.assert_array_equal(s.features, f)
        np.testing.assert_array_equal(s.labels, y)
        np.testing.assert_array_equal(s.index, np.arange(n))
        np.testing.assert_array_equal(s.logits, lg)


# -- reader errors --------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FeatureFileError, match=r"does not exist.*tools/extract\.py"):
        open_features(tmp_path / "nope.h5")


def test_truncated_file(good_file):
    size = good_file.stat().st_size
    with open(good_file, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(FeatureFileError, match="truncated or corrupt"):
        open_features(good_file)


def test_not_hdf5(tmp_path):
    p = tmp_path / "feats.h5"
    p.write_bytes(np.random.RandomState(0).bytes(4096))
    with pytest.raises(FeatureFileError, match="not an HDF5 file"):
        open_features(p)


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def test_format_version(good_file):
    _edit(good_file, lambda f: f.attrs.__setitem__("format_version", 99))
    with pytest.raises(FeatureFileError, match="format_version 99"):
        open_features(good_file)


def test_incomplete_flag(good_file):
    _edit(good_file, lambda f: f.attrs.__setitem__("complete", False))
    with pytest.raises(FeatureFileError, match="incomplete"):
        open_features(good_file)


def test_missing_dataset(good_file):
    _edit(good_file, lambda f: f["val"].__delitem__("index"))
    with pytest.raises(FeatureFileError, match="'val' has no dataset 'index'"):
        open_features(good_file)


def test_missing_required_attr(good_file):
    _edit(good_file, lambda f: f.attrs.__delitem__("num_classes"))
    with pytest.raises(FeatureFileError, match="num_classes"):
        open_features(good_file)


def test_shape_mismatch(good_file):
    _edit(good_file, lambda f: f.attrs.__setitem__("feature_dim", D + 1))
    with pytest.raises(FeatureFileError, match="expected \\(N, 9\\)"):
        open_features(good_file)


def test_labels_out_of_range(good_file):
    def fn(f):
        f["test"]["labels"][4] = C
    _edit(good_file, fn)
    with pytest.raises(FeatureFileError, match="'test' row 4: label 5"):
        open_features(good_file)


def test_nan_features_on_read(good_file):
    def fn(f):
        f["val"]["features"][13, 2] = np.inf
    _edit(good_file, fn)
    with open_features(good_file) as ff:
        ff.load("train")
        with pytest.raises(FeatureFileError, match=r"'val' row 13.*re-extract"):
            ff.load("val")
        with pytest.raises(FeatureFileError, match="'val' row 13"):
            list(ff.iter_chunks("val", 5))


def test_no_logits(tmp_path, data):
    path = write_all(tmp_path / "feats.h5", data, with_logits=False)
    with open_features(path) as ff:
        assert not ff.has_logits("train")
        assert ff.load("train").logits is None
        assert all(c.logits is None for c in ff.iter_chunks("test", 4))


def test_other_program_file(tmp_path, data):
    """A file written with plain h5py in the schema, without optional attrs, and no val split."""
    p = tmp_path / "theirs.h5"
    with h5py.File(p, "w") as f:
        f.attrs["num_classes"] = C
        f.attrs["feature_dim"] = D
        for split in ("train", "test"):
            feats, y, i, _ = data[split]
            f[f"{split}/features"] = feats.astype(np.float16)
            f[f"{split}/labels"] = y.astype(np.int32)
            f[f"{split}/index"] = i
    with open_features(p) as ff:
        assert ff.splits == ["train", "test"]
        np.testing.assert_array_equal(ff.class_counts, np.bincount(data["train"][1], minlength=C))
        s = ff.load("test")
        assert s.features.dtype == np.float32 and s.labels.dtype == np.int64 and s.logits is None
        with pytest.raises(FeatureFileError, match="no split 'val'"):
            ff.load("val")


def test_sha256_file(tmp_path):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"abc")
    assert sha256_file(p, chunk=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_empty_split_and_dtype(tmp_path, data):
    f, y, i, lg = data["train"]
    with FeatureWriter(tmp_path / "e.h5", split_sizes={"train": 50, "val": 0}, feature_dim=D,
                       num_classes=C, attrs=ATTRS) as w:
        w.append("train", f, y, i, lg)
        path = w.finalize()
    with open_features(path) as ff:
        assert ff.splits == ["train", "val"] and len(ff.load("val")) == 0
        assert list(ff.iter_chunks("val", 8)) == []
        assert ff.load("train", dtype=np.float64).features.dtype == np.float64


# -- output paths that cannot be written ----------------------------------------------------


def _refused_unwritable(path, folder, reason):
    """FeatureWriter(path) is refused as a usage error naming ``folder`` and ``reason``, and
    not as a corrupt .partial (there is none)."""
    from glag.errors import UsageError

    with pytest.raises(UsageError, match="cannot write in") as err:
        FeatureWriter(path, split_sizes=SIZES, feature_dim=D, num_classes=C, attrs=ATTRS)
    msg = str(err.value)
    assert f"cannot write in {folder} (" in msg and reason in msg and "choose another --out" in msg, msg
    assert "corrupt" not in msg and "Delete it" not in msg, msg


def test_unwritable_output_folder(tmp_path, monkeypatch):
    """A read-only folder (simulated: HDF5 cannot create the file there, EROFS), a missing
    subfolder of one (mkdir fails), --out under a regular file: each refused naming the folder,
    nothing written."""
    import errno
    import pathlib

    import glag.features as features_mod

    real_file = h5py.File

    def read_only_file(name, mode="r", *a, **kw):
        if mode != "r":
            raise OSError(errno.EROFS, f"Unable to synchronously create file (unable to open file: name = "
                                       f"'{name}', errno = 30, error message = 'Read-only file system')")
        return real_file(name, mode, *a, **kw)

    monkeypatch.setattr(features_mod.h5py, "File", read_only_file)
    _refused_unwritable(tmp_path / "f.h5", tmp_path, "Read-only file system")
    assert list(tmp_path.iterdir()) == []
    # a .partial to resume in a folder that has become read-only: not "corrupt" either
    monkeypatch.setattr(features_mod.h5py, "File", real_file)
    w = FeatureWriter(tmp_path / "g.h5", split_sizes=SIZES, feature_dim=D, num_classes=C, attrs=ATTRS)
    w.close()
    monkeypatch.setattr(features_mod.h5py, "File", read_only_file)
    _refused_unwritable(tmp_path / "g.h5", tmp_path, "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.h5.partial"]
    monkeypatch.setattr(features_mod.h5py, "File", real_file)

    def read_only_mkdir(self, *a, **kw):
        if not self.is_dir():
            raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    _refused_unwritable(tmp_path / "ro" / "sub" / "f.h5", tmp_path / "ro" / "sub", "Read-only file system")
    monkeypatch.undo()
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a folder")
    _refused_unwritable(afile / "f.h5", afile, "is a file, not a folder")
    _refused_unwritable(afile / "sub" / "f.h5", afile / "sub", "is a file, not a folder")
    assert afile.read_bytes() == b"not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "g.h5.partial"]


def test_output_path_is_a_folder(tmp_path):
    """A folder as the output path is refused up front, with or without overwrite (os.replace
    could never put the file there), and nothing is created beside it."""
    out = tmp_path / "outdir"
    out.mkdir()
    for overwrite in (False, True):
        with pytest.raises(FeatureFileError, match=r"outdir: is a folder"):
            FeatureWriter(out, split_sizes=SIZES, feature_dim=D, num_classes=C, attrs=ATTRS, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["outdir"] and list(out.iterdir()) == []


def test_a_folder_without_room_is_refused_before_writing(tmp_path, monkeypatch, data):
    """HDF5 meeting a full disk part-way fails inside its cache (a segfault, seen on a full tmpfs):
    the writer compares the file's size with the space left first, and writes nothing."""
    import glag.features as features

    real = os.statvfs

    def small(path, free=2 << 20):
        st = real(path)
        return os.statvfs_result((st.f_bsize, 4096, st.f_blocks, st.f_bfree, free // 4096, *st[5:]))

    sizes = {"train": 5000}
    monkeypatch.setattr(features.os, "statvfs", small)
    with pytest.raises(FeatureFileError, match=r"needs about 20\.2 MiB more and .* has 2\.0 MiB free; free "
                                               r"space there or choose another --out"):
        FeatureWriter(tmp_path / "f.h5", split_sizes=sizes, feature_dim=1000, num_classes=C, attrs=ATTRS)
    assert list(tmp_path.iterdir()) == []
    w = FeatureWriter(tmp_path / "g.h5", split_sizes={"train": 100}, feature_dim=D, num_classes=C, attrs=ATTRS)
    assert w.nbytes_estimate() == 100 * (D * 4 + 16 + 4 * C) + (1 << 20)
    w.close()


def test_a_file_already_open_in_this_process_is_read(good_file):
    """A notebook that already holds the file open with h5py (its default locking) could not open
    it with open_features, and was told to re-extract a healthy file."""
    with h5py.File(good_file, "r") as h:
        with open_features(good_file) as ff:
            np.testing.assert_array_equal(ff.load("train").features, h["train/features"][...])
        assert h["train/features"].shape[0] == SIZES["train"]  # still usable after ff closed
