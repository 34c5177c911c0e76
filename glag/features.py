"""The HDF5 feature store: streaming, atomic, resumable writing and validated reading.

One file holds the stage-one features of every split (DESIGN.md, "The feature store")::

    /train, /val, /test                  groups; only /train is required
        features   (N, d) float32 | float16   penultimate-layer features
        labels     (N,)   int64               class ids in [0, C)
        index      (N,)   int64               the sample's index in its dataset
        logits     (N, C) float32             stage-one logits, the KD teacher (optional)
    root attributes: format_version, num_classes, feature_dim, class_counts (int64 [C], train),
                     backbone, checkpoint_sha256, dataset, created_by, complete

Writing (:class:`FeatureWriter`) goes to ``<path>.partial``: datasets are created full size and
chunked by rows, every :meth:`FeatureWriter.append` writes its batch, flushes, then advances the
split's ``rows_done`` attribute and flushes again, so a killed run loses at most the batch in
flight and resumes from ``rows_done``. :meth:`FeatureWriter.finalize` validates the file, marks it
``complete``, fsyncs and renames it, so a reader never sees a half-written file under the final
name. Reading (:func:`open_features`) validates the schema and names what is wrong and how to fix
it; :meth:`FeatureFile.iter_chunks` streams a split in bounded memory (iNaturalist at d = 2048 is
3.6 GB of float32 features).

Typical use (the extractor must visit samples in a fixed order so that a resume can skip rows)::

    with FeatureWriter("feats.h5", split_sizes={"train": n_tr, "test": n_te}, feature_dim=d,
                       num_classes=C, attrs={"backbone": "resnet32", "dataset": "cifar100_lt",
                                             "checkpoint_sha256": sha256_file(ckpt)}) as w:
        for split in w.splits:
            for feats, labels, index, logits in batches(split, skip=w.rows_done(split)):
                w.append(split, feats, labels, index, logits)
        w.finalize()

    with open_features("feats.h5") as ff:
        train = ff.load("train")                  # FeatureSplit, features float32 [N, d]
        for part in ff.iter_chunks("test", 4096):  # bounded memory
            ...
"""
from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from glag import __version__
from glag.errors import UsageError
from glag.options import first_nonfinite_row

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
FEATURE_DTYPES = ("float32", "float16")
PARTIAL_SUFFIX = ".partial"

# Target size of one HDF5 chunk of features; rows per chunk = this / (d * itemsize).
_CHUNK_BYTES = 1 << 20
# Rows read at a time by the reader (finite check, float16 -> float32): ~32 MiB of float32.
_READ_BYTES = 32 << 20
# Chunk cache of the writer, so that batches that do not align with chunks stay cheap.
_WRITER_CACHE_BYTES = 32 << 20

_RESERVED_ATTRS = ("format_version", "num_classes", "feature_dim", "complete")
# errno values of an output that cannot be written (not a corrupt one)
_WRITE_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)
_EXTRACT_HINT = "make one with tools/extract.py (glag-extract)"


class FeatureFileError(UsageError):
    """Any problem with a feature file. The message names the file, the problem and the fix."""


def _err(path: str | os.PathLike, problem: str, fix: str) -> FeatureFileError:
    return FeatureFileError(f"{os.fspath(path)}: {problem}. {fix}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time (e.g. a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _to_numpy(x: Any) -> np.ndarray:
    """numpy array from a numpy array, a torch tensor (any device) or a sequence."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _py(value: Any) -> Any:
    """An HDF5 attribute value as a plain Python value (bytes -> str, numpy scalar -> item)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype.kind in "SO":
        return [_py(v) for v in value.tolist()]
    return value


def _attr_value(key: str, value: Any) -> Any:
    """Validate/convert a user attribute for HDF5 storage."""
    if isinstance(value, (str, bool, int, float, np.generic)):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value)
        if arr.dtype.kind in "biuf":
            return arr
    raise TypeError(
        f"feature-file attribute {key!r} has unsupported type {type(value).__name__}; "
        "use str, int, float, bool or a numeric array (serialise anything else to a JSON string)"
    )


def _default_chunk_rows(n_rows: int, feature_dim: int, itemsize: int) -> int:
    return max(1, min(n_rows, _CHUNK_BYTES // max(1, feature_dim * itemsize)))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class FeatureWriter:
    """Streams rows into ``<path>.partial``; :meth:`finalize` fsyncs and ``os.replace``s it to
    ``path``. A reader never sees a half-written file under the final name.

    Args:
        path: final file name, e.g. ``runs/x/feats.h5``; the parent folder is created.
        split_sizes: rows per split, e.g. ``{"train": 10847, "val": 2000, "test": 10000}``;
            keys from ``("train", "val", "test")``, ``train`` required.
        feature_dim: d, the feature width.
        num_classes: C.
        attrs: root attributes, typically ``backbone``, ``checkpoint_sha256``, ``dataset``
            (``created_by`` defaults to ``"glag <version>"``). ``class_counts`` is computed
            from the train labels at :meth:`finalize`; if given here it must match them.
        dtype: ``"float32"`` or ``"float16"``, the on-disk feature dtype (logits stay float32).
        with_logits: store the stage-one logits (N, C) for knowledge distillation.
        chunk_rows: rows per HDF5 chunk; default: ~1 MiB of features per chunk.
        overwrite: allow replacing an existing complete file at ``path`` (only at
            :meth:`finalize`, so the old file survives until the new one is complete).

    Resume: if ``<path>.partial`` exists and its identity (split sizes, feature_dim,
    num_classes, dtype, with_logits, checkpoint_sha256, dataset, format_version) matches, the
    writer resumes it and :meth:`rows_done` says where each split stands; the caller skips that
    many rows (the extraction order must be deterministic). A mismatch raises
    :class:`FeatureFileError`; a ``.partial`` is never silently overwritten.

    As a context manager: on an exception the file is closed and the ``.partial`` kept for
    resume; on a clean exit without :meth:`finalize` it is closed, kept, and a warning logged.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split_sizes: dict[str, int],
        feature_dim: int,
        num_classes: int,
        attrs: dict | None = None,
        dtype: str = "float32",
        with_logits: bool = True,
        chunk_rows: int | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        if self.path.name.endswith(PARTIAL_SUFFIX):
            raise ValueError(f"{self.path}: give the final file name, not the {PARTIAL_SUFFIX} name")
        self.partial_path = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.split_sizes = self._check_split_sizes(split_sizes)
        self.splits = [s for s in SPLITS if s in self.split_sizes]
        if int(feature_dim) < 1 or int(num_classes) < 1:
            raise ValueError(f"feature_dim and num_classes must be >= 1, got {feature_dim}, {num_classes}")
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self.with_logits = bool(with_logits)
        self.overwrite = bool(overwrite)
        if chunk_rows is not None and int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.chunk_rows = None if chunk_rows is None else int(chunk_rows)

        attrs = dict(attrs or {})
        for key in _RESERVED_ATTRS:
            if key in attrs:
                raise ValueError(f"attribute {key!r} is set by FeatureWriter itself; drop it from attrs")
        attrs.setdefault("created_by", f"glag {__version__}")
        self._expected_counts = None
        if "class_counts" in attrs:
            self._expected_counts = np.asarray(attrs.pop("class_counts"), dtype=np.int64)
        self.attrs = {k: _attr_value(k, v) for k, v in attrs.items() if v is not None}

        if self.path.is_dir():  # os.replace could never put the file there, even with overwrite
            raise _err(self.path, "is a folder, not a feature file",
                       f"Give the file to write (--out), e.g. {self.path / 'feats.h5'}")
        if self.path.exists() and not self.overwrite:
            raise _err(self.path, "already exists (a complete feature file is never replaced silently)",
                       "Pass overwrite=True (--overwrite), delete it, or choose another output path")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._cannot_write(e) from e

        self._h5: h5py.File | None = None
        self._finalized = False
        self._check_space()
        if self.partial_path.exists():
            self._resume()
        else:
            self._create()

    def nbytes_estimate(self) -> int:
        """The complete file's size in bytes, about: every row's features, labels, index and
        logits, plus 1 MiB of HDF5 metadata."""
        per_row = self.feature_dim * np.dtype(self.dtype).itemsize + 16 + (4 * self.num_classes if self.with_logits
                                                                             else 0)
        return sum(self.split_sizes.values()) * per_row + (1 << 20)

    def _check_space(self) -> None:
        """Refuse, before writing, a file its folder has no room for: HDF5 meeting a full disk
        part-way fails inside its cache, in C, and can take the process down with it."""
        try:
            st = os.statvfs(self.path.parent)
        except (OSError, AttributeError):  # not POSIX: HDF5's own error, later
            return
        free = st.f_bavail * st.f_frsize
        have = self.partial_path.stat().st_size if self.partial_path.exists() else 0
        need = self.nbytes_estimate() - have
        if need > free:
            raise FeatureFileError(
                f"{self.path}: the feature file needs about {need / 2**20:,.1f} MiB more and {self.path.parent} "
                f"has {free / 2**20:,.1f} MiB free; free space there or choose another --out (an unfinished "
                f"extraction resumes when run again)")

    # -- set-up ---------------------------------------------------------------------------

    @staticmethod
    def _check_split_sizes(split_sizes: dict[str, int]) -> dict[str, int]:
        unknown = set(split_sizes) - set(SPLITS)
        if unknown:
            raise ValueError(f"unknown split(s) {sorted(unknown)}; splits are {SPLITS}")
        if "train" not in split_sizes:
            raise ValueError("split_sizes must include 'train' (class_counts come from it)")
        sizes = {s: int(n) for s, n in split_sizes.items()}
        if any(n < 0 for n in sizes.values()) or sizes["train"] < 1:
            raise ValueError(f"split sizes must be >= 0 (train >= 1), got {sizes}")
        return sizes

    def _cannot_write(self, e: OSError) -> FeatureFileError:
        """The output folder cannot take the file (read-only, no permission, full, a file where
        a folder should be, ...): a usage error naming the folder and the reason."""
        folder = self.path.parent
        reason = os.strerror(e.errno) if e.errno else str(e)
        for p in (*reversed(folder.parents), folder):  # --out under a regular file
            if os.path.exists(p) and not os.path.isdir(p):  # (os.path: never raises)
                reason = f"{p} is a file, not a folder"
                break
        return FeatureFileError(f"{self.path}: cannot write in {folder} ({reason}); choose another --out")

    def _open(self, mode: str, path: Path | None = None) -> h5py.File:
        path = path or self.partial_path
        try:
            # Default libver on purpose: superblock v0 has no "open for writing" flag, so a
            # .partial left by a killed process reopens without h5clear.
            return h5py.File(path, mode, rdcc_nbytes=_WRITER_CACHE_BYTES)
        except OSError as e:
            # HDF5 says "unable to lock file" when another process holds it; a truncated file's
            # message mentions the "sblock" (superblock), which is no lock at all
            if "unable to lock file" in str(e).lower():
                raise _err(self.partial_path, f"cannot be locked ({e}); another extraction may be "
                           "writing it", "Wait for it or stop it; on a file system without locking "
                           "set HDF5_USE_FILE_LOCKING=FALSE") from e
            # a new file (mode "w") has nothing to be corrupt: the folder refused it; an existing
            # .partial refused for writing is no corrupt file either (HDF5 sets errno for both)
            if mode == "w" or e.errno in _WRITE_REFUSED:
                raise self._cannot_write(e) from e
            raise _err(self.partial_path, f"is an unreadable or corrupt unfinished extraction ({e})",
                       "Delete it and run the extraction again") from e

    def _skeleton(self, host: str, pid: int | str) -> Path:
        """Where ``_create`` lays out a new file before renaming it to the .partial."""
        return self.partial_path.with_name(f".{self.partial_path.name}.{host}.{pid}.init")

    def _remove_dead_skeletons(self) -> None:
        """Remove the skeletons of writers killed while laying out a file: those made on this host
        by a process that no longer runs (another host's, or a live process's, are left alone)."""
        host = platform.node() or "host"
        prefix = self._skeleton(host, "").name[: -len(".init")]  # ".<name>.partial.<host>."
        for path in self.partial_path.parent.glob(glob.escape(prefix) + "*.init"):
            pid = path.name[len(prefix): -len(".init")]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:  # gone: its skeleton can never be finished
                path.unlink(missing_ok=True)
                log.info("removed %s, left by an extraction killed while creating its file", path)
            except PermissionError:  # alive (another user's)
                pass

    def _create(self) -> None:
        # The skeleton (attributes, empty datasets) is built under a temporary name and renamed to
        # .partial only once it is whole: a kill while HDF5 lays it out leaves no unusable .partial
        # (and the next writer of this file removes what it left).
        self._remove_dead_skeletons()
        skeleton = self._skeleton(platform.node() or "host", os.getpid())
        f = self._open("w", skeleton)
        try:
            try:
                self._lay_out(f)
                f.flush()
            finally:
                f.close()
            os.replace(skeleton, self.partial_path)
        except OSError as e:  # e.g. the disk filled up: no skeleton left behind
            skeleton.unlink(missing_ok=True)
            if e.errno:
                raise self._cannot_write(e) from e
            raise
        self._h5 = self._open("r+")
        log.info("writing features to %s (splits %s, d=%d, C=%d, %s)", self.partial_path,
                 self.split_sizes, self.feature_dim, self.num_classes, self.dtype)

    def _lay_out(self, f: h5py.File) -> None:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["num_classes"] = self.num_classes
        f.attrs["feature_dim"] = self.feature_dim
        f.attrs["complete"] = False
        for key, value in self.attrs.items():
            f.attrs[key] = value
        itemsize = np.dtype(self.dtype).itemsize
        for split in self.splits:
            n = self.split_sizes[split]
            g = f.create_group(split)
            rows = min(n, self.chunk_rows or _default_chunk_rows(n, self.feature_dim, itemsize))

            def chunks(*tail: int) -> tuple[int, ...] | None:
                return (rows, *tail) if n > 0 else None  # an empty dataset cannot be chunked

            g.create_dataset("features", shape=(n, self.feature_dim), dtype=self.dtype,
                             chunks=chunks(self.feature_dim))
            g.create_dataset("labels", shape=(n,), dtype=np.int64, chunks=chunks())
            g.create_dataset("index", shape=(n,), dtype=np.int64, chunks=chunks())
            if self.with_logits:
                g.create_dataset("logits", shape=(n, self.num_classes), dtype=np.float32,
                                 chunks=chunks(self.num_classes))
            g.attrs["rows_done"] = 0

    def _identity_of_file(self, f: h5py.File) -> dict[str, Any]:
        ident: dict[str, Any] = {
            "format_version": _py(f.attrs.get("format_version")),
            "num_classes": _py(f.attrs.get("num_classes")),
            "feature_dim": _py(f.attrs.get("feature_dim")),
            "checkpoint_sha256": _py(f.attrs.get("checkpoint_sha256")),
            "dataset": _py(f.attrs.get("dataset")),
        }
        sizes, dtypes, logits = {}, set(), set()
        for split in SPLITS:
            if split in f and "features" in f[split]:
                sizes[split] = int(f[split]["features"].shape[0])
                dtypes.add(str(f[split]["features"].dtype))
                logits.add("logits" in f[split])
        ident["split_sizes"] = sizes
        ident["dtype"] = dtypes.pop() if len(dtypes) == 1 else sorted(dtypes)
        ident["with_logits"] = logits.pop() if len(logits) == 1 else sorted(logits)
        return ident

    def _identity_wanted(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "checkpoint_sha256": _py(self.attrs.get("checkpoint_sha256")),
            "dataset": _py(self.attrs.get("dataset")),
            "split_sizes": dict(self.split_sizes),
            "dtype": self.dtype,
            "with_logits": self.with_logits,
        }

    def _resume(self) -> None:
        f = self._open("r+")
        try:
            have, want = self._identity_of_file(f), self._identity_wanted()
            diffs = [f"{k}: file has {have[k]!r}, this run wants {want[k]!r}"
                     for k in want if have[k] != want[k]]
            if diffs:
                raise _err(self.partial_path, "is an unfinished extraction with different settings ("
                           + "; ".join(diffs) + ")",
                           "Delete the .partial file to start over, or rerun with the same "
                           "checkpoint, dataset and options to resume it")
            for split in self.splits:
                done = int(f[split].attrs.get("rows_done", -1))
                if not 0 <= done <= self.split_sizes[split]:
                    raise _err(self.partial_path, f"split {split!r} has an invalid rows_done={done}",
                               "Delete the .partial file and run the extraction again")
            for key, value in self.attrs.items():  # e.g. a newer created_by
                f.attrs[key] = value
            f.attrs["complete"] = False
            f.flush()
        except BaseException:
            f.close()
            raise
        self._h5 = f
        log.info("resuming %s: %s", self.partial_path, ", ".join(
            f"{s} {self.rows_done(s)}/{self.split_sizes[s]} rows" for s in self.splits))

    # -- writing --------------------------------------------------------------------------

    def _file(self) -> h5py.File:
        if self._h5 is None:
            raise RuntimeError(f"{self.partial_path}: the writer is closed")
        return self._h5

    def rows_done(self, split: str) -> int:
        """Rows of ``split`` already written (and flushed); the next append starts there."""
        if split not in self.split_sizes:
            raise KeyError(f"unknown split {split!r}; this file has {self.splits}")
        return int(self._file()[split].attrs["rows_done"])

    def append(self, split: str, features: Any, labels: Any, index: Any, logits: Any = None) -> None:
        """Append one batch to ``split`` at :meth:`rows_done`.

        Args:
            features: (B, d) floating array or tensor; must be finite (and within float16 range
                when ``dtype="float16"``).
            labels: (B,) integer class ids in [0, C).
            index: (B,) integer sample indices in the dataset.
            logits: (B, C) floating, finite; required iff ``with_logits``.

        The batch is written, the file flushed, then ``rows_done`` advanced and flushed again:
        a kill at any point loses at most this batch.
        """
        f = self._file()
        if split not in self.split_sizes:
            raise KeyError(f"unknown split {split!r}; this file has {self.splits}")
        feats = _to_numpy(features)
        labs = _to_numpy(labels)
        idx = _to_numpy(index)
        where = f"{self.partial_path}, split {split!r}"
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim or feats.dtype.kind != "f":
            raise ValueError(f"{where}: features must be floating (B, {self.feature_dim}), "
                             f"got {feats.dtype} {feats.shape}")
        b = feats.shape[0]
        for name, a in (("labels", labs), ("index", idx)):
            if a.shape != (b,) or a.dtype.kind not in "iu":
                raise ValueError(f"{where}: {name} must be integer ({b},), got {a.dtype} {a.shape}")
        lg = None
        if self.with_logits:
            if logits is None:
                raise ValueError(f"{where}: logits are required (writer made with with_logits=True)")
            lg = _to_numpy(logits)
            if lg.shape != (b, self.num_classes) or lg.dtype.kind != "f":
                raise ValueError(f"{where}: logits must be floating ({b}, {self.num_classes}), "
                                 f"got {lg.dtype} {lg.shape}")
        elif logits is not None:
            raise ValueError(f"{where}: got logits but the writer was made with with_logits=False")
        if b == 0:
            return

        start = self.rows_done(split)
        stop = start + b
        if stop > self.split_sizes[split]:
            raise _err(self.partial_path, f"split {split!r} overflows: {start} rows done + batch "
                       f"of {b} > split size {self.split_sizes[split]}",
                       "Pass the true split sizes to FeatureWriter, and skip rows_done(split) rows "
                       "when resuming")
        if labs.size and (labs.min() < 0 or labs.max() >= self.num_classes):
            bad = int(np.argmax((labs < 0) | (labs >= self.num_classes)))
            raise _err(self.partial_path, f"split {split!r} row {start + bad}: label {int(labs[bad])} "
                       f"outside [0, {self.num_classes})", "Check num_classes and the dataset's labels")
        row = first_nonfinite_row(feats)
        if row is not None:
            raise _err(self.partial_path, f"split {split!r} row {start + row}: feature is NaN or inf",
                       "The backbone produced non-finite features; check the checkpoint "
                       "(a diverged run?) and the input pipeline")
        limit = float(np.finfo(self.dtype).max)
        big = np.abs(feats) > limit
        if big.any():
            row = int(np.argmax(big.any(axis=1)))
            fix = "Write dtype='float32' (--dtype float32)" if self.dtype == "float16" else \
                "The backbone's features overflow float32; check the checkpoint (a diverged run?)"
            raise _err(self.partial_path, f"split {split!r} row {start + row}: feature "
                       f"magnitude {float(np.abs(feats[row]).max()):.4g} exceeds the {self.dtype} "
                       f"range ({limit:g})", fix)
        feats_disk = feats.astype(self.dtype, copy=False)
        if lg is not None:
            with np.errstate(over="ignore"):  # an overflow is reported below, by row
                lg = lg.astype(np.float32, copy=False)  # as stored
            row = first_nonfinite_row(lg)
            if row is not None:
                raise _err(self.partial_path, f"split {split!r} row {start + row}: logits are NaN "
                           "or inf (in float32, as stored)", "Check the stage-one checkpoint (a diverged run?)")

        g = f[split]
        g["features"][start:stop] = feats_disk
        g["labels"][start:stop] = labs.astype(np.int64, copy=False)
        g["index"][start:stop] = idx.astype(np.int64, copy=False)
        if lg is not None:
            g["logits"][start:stop] = lg
        f.flush()  # data on disk (OS) before the counter says so
        g.attrs["rows_done"] = stop
        f.flush()

    # -- finishing ------------------------------------------------------------------------

    def _train_class_counts(self, f: h5py.File) -> np.ndarray:
        labels = f["train"]["labels"]
        counts = np.zeros(self.num_classes, dtype=np.int64)
        step = 1 << 20
        for a in range(0, labels.shape[0], step):
            counts += np.bincount(labels[a:a + step], minlength=self.num_classes)
        return counts

    def finalize(self) -> Path:
        """Check every split is full, set ``class_counts`` and ``complete=True``, close, fsync,
        and atomically rename ``<path>.partial`` to ``path``. Returns ``path``."""
        f = self._file()
        missing = {s: f"{self.rows_done(s)}/{n}" for s, n in self.split_sizes.items()
                   if self.rows_done(s) != n}
        if missing:
            raise _err(self.partial_path, f"is not full yet (rows written: {missing})",
                       "Append the remaining rows before finalize(); the .partial is kept for resume")
        counts = self._train_class_counts(f)
        if self._expected_counts is not None and not np.array_equal(counts, self._expected_counts):
            raise _err(self.partial_path, "class_counts given in attrs do not match the train "
                       "labels written", "Drop class_counts from attrs (it is computed) or fix them")
        f.attrs["class_counts"] = counts
        f.attrs["complete"] = True
        f.flush()
        try:
            _validate_schema(f, self.partial_path)
        finally:
            f.close()
            self._h5 = None
        with open(self.partial_path, "rb") as fh:
            os.fsync(fh.fileno())
        if self.path.exists() and not self.overwrite:  # appeared while we were writing
            raise _err(self.path, "already exists (a complete feature file is never replaced "
                       "silently)", f"Pass overwrite=True; the new file is kept at {self.partial_path}")
        os.replace(self.partial_path, self.path)
        try:  # make the rename itself durable
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
        self._finalized = True
        log.info("wrote %s (%s)", self.path, ", ".join(f"{s} {n} rows" for s, n in self.split_sizes.items()))
        return self.path

    def close(self) -> None:
        """Close without finalizing; the ``.partial`` stays for a later resume."""
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        was_open = self._h5 is not None
        self.close()
        if exc_type is None and was_open and not self._finalized:
            log.warning("%s closed without finalize(); it is kept as %s for resume",
                        self.path, self.partial_path)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureSplit:
    """Rows of one split, in memory.

    features: float32 [N, d]; labels: int64 [N]; index: int64 [N] (sample index in its dataset);
    logits: float32 [N, C] or None; start: the first row's position within the split.
    """

    features: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    logits: np.ndarray | None
    start: int = 0

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _int_attr(f: h5py.File, path: str | os.PathLike, key: str) -> int:
    if key not in f.attrs:
        raise _err(path, f"is missing the required root attribute {key!r}",
                   "Add it (h5py: f.attrs[...] = ...) or re-extract with tools/extract.py")
    value = _py(f.attrs[key])
    if isinstance(value, (list, np.ndarray)) and np.size(value) == 1:
        value = np.asarray(value).reshape(()).item()
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise _err(path, f"root attribute {key!r} = {value!r} is not a positive integer",
                   "Fix the attribute or re-extract with tools/extract.py")
    return int(value)


def _validate_schema(f: h5py.File, path: str | os.PathLike) -> dict[str, Any]:
    """Check layout, attributes, shapes, dtypes and label ranges of an open file.

    Returns ``{"num_classes", "feature_dim", "splits", "class_counts" (int64 [C]),
    "counts_computed" (bool)}``. Reads every split's labels (8 bytes a row), not its features.
    """
    re_extract = "Re-extract with tools/extract.py"
    if "complete" in f.attrs and not bool(_py(f.attrs["complete"])):
        raise _err(path, "is marked incomplete (complete=False): an interrupted extraction",
                   "Rerun tools/extract.py with the same options to resume and finish it")
    if "format_version" in f.attrs:
        version = _py(f.attrs["format_version"])
        if version != FORMAT_VERSION:
            raise _err(path, f"has format_version {version!r}; this glag ({__version__}) reads "
                       f"format_version {FORMAT_VERSION}",
                       f"{re_extract}, or use the glag version that wrote it")
    num_classes = _int_attr(f, path, "num_classes")
    feature_dim = _int_attr(f, path, "feature_dim")
    splits = [s for s in SPLITS if s in f]
    if "train" not in splits:
        raise _err(path, f"has no '/train' group (groups: {sorted(f.keys())})",
                   f"{re_extract}; a feature file needs at least the train split")

    labels_by_split: dict[str, np.ndarray] = {}
    for split in splits:
        g = f[split]
        if not isinstance(g, h5py.Group):
            raise _err(path, f"'/{split}' is not a group", re_extract)
        for name in ("features", "labels", "index"):
            if name not in g or not isinstance(g[name], h5py.Dataset):
                raise _err(path, f"split {split!r} has no dataset {name!r}",
                           f"{re_extract}; each split needs features, labels and index")
        feats, labels, index = g["features"], g["labels"], g["index"]
        if feats.ndim != 2 or feats.shape[1] != feature_dim:
            raise _err(path, f"'/{split}/features' has shape {feats.shape}, expected (N, {feature_dim}) "
                       f"from feature_dim", "Fix feature_dim or re-extract")
        n = feats.shape[0]
        if feats.dtype.kind != "f":
            raise _err(path, f"'/{split}/features' has dtype {feats.dtype}, expected float32/float16",
                       re_extract)
        for name, ds in (("labels", labels), ("index", index)):
            if ds.shape != (n,):
                raise _err(path, f"'/{split}/{name}' has shape {ds.shape}, expected ({n},) "
                           "to match the features", re_extract)
            if ds.dtype.kind not in "iu":
                raise _err(path, f"'/{split}/{name}' has dtype {ds.dtype}, expected int64", re_extract)
        if "logits" in g:
            lg = g["logits"]
            if not isinstance(lg, h5py.Dataset) or lg.shape != (n, num_classes) or lg.dtype.kind != "f":
                raise _err(path, f"'/{split}/logits' is {getattr(lg, 'dtype', '?')} "
                           f"{getattr(lg, 'shape', '?')}, expected float ({n}, {num_classes})",
                           "Fix num_classes, delete the logits dataset, or re-extract")
        lab = labels[...].astype(np.int64, copy=False) if n else np.zeros(0, np.int64)
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            row = int(np.argmax((lab < 0) | (lab >= num_classes)))
            raise _err(path, f"split {split!r} row {row}: label {int(lab[row])} is outside "
                       f"[0, {num_classes})", "Fix num_classes or the labels, or re-extract")
        labels_by_split[split] = lab

    computed = np.bincount(labels_by_split["train"], minlength=num_classes).astype(np.int64)
    counts_computed = "class_counts" not in f.attrs
    if counts_computed:
        class_counts = computed
    else:
        class_counts = np.asarray(f.attrs["class_counts"])
        if class_counts.shape != (num_classes,) or class_counts.dtype.kind not in "iu":
            raise _err(path, f"root attribute class_counts is {class_counts.dtype} "
                       f"{class_counts.shape}, expected int64 ({num_classes},)",
                       "Delete the attribute (it is then computed from the train labels) or re-extract")
        class_counts = class_counts.astype(np.int64)
        if not np.array_equal(class_counts, computed):
            raise _err(path, "root attribute class_counts does not match the train labels",
                       "Delete the attribute (it is then computed from the train labels) or re-extract")
    return {"num_classes": num_classes, "feature_dim": feature_dim, "splits": splits,
            "class_counts": class_counts, "counts_computed": counts_computed}


def open_features(path: str | os.PathLike) -> "FeatureFile":
    """Open and validate a feature file; raise :class:`FeatureFileError` naming any problem."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX):
        raise _err(path, "is an unfinished extraction (a .partial file)",
                   "Rerun tools/extract.py with the same options to resume it, then open "
                   f"{path.name[:-len(PARTIAL_SUFFIX)]}")
    if not path.exists():
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        if partial.exists():
            raise _err(path, f"does not exist, but {partial.name} does: the extraction was "
                       "interrupted", "Rerun tools/extract.py with the same options to resume it")
        raise _err(path, "does not exist", f"Check the path, or {_EXTRACT_HINT}")
    if path.is_dir():
        raise _err(path, "is a folder, not a feature file", f"Give the .h5 file, or {_EXTRACT_HINT}")
    if not h5py.is_hdf5(path):
        raise _err(path, "is not an HDF5 file", f"Give a glag feature file (.h5), or {_EXTRACT_HINT}")
    try:
        # No locking: a complete file is never written in place (writers rename), and locking
        # fails on some network file systems.
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        if "locking" not in str(e):
            raise _err(path, f"is a truncated or corrupt HDF5 file ({e})",
                       "Copy it again if it was transferred, or re-extract with tools/extract.py") from e
        # already open in this process (h5py.File with its default locking, say, in a notebook):
        # HDF5 shares the open file, and only under the locking it was opened with
        try:
            f = h5py.File(path, "r")
        except OSError as e2:
            raise _err(path, f"is open in this process with other settings ({e2})",
                       "Close the other h5py.File of it first") from e2
    try:
        info = _validate_schema(f, path)
    except BaseException:
        f.close()
        raise
    return FeatureFile(path, f, info)


class FeatureFile:
    """A validated, open feature file; use :func:`open_features` to make one.

    Attributes: ``path``; ``attrs`` (root attributes as plain Python values); ``num_classes``;
    ``feature_dim``; ``class_counts`` (int64 [C], train); ``splits`` (present, in
    train/val/test order).
    """

    def __init__(self, path: Path, h5: h5py.File, info: dict[str, Any]):
        self.path = path
        self._h5: h5py.File | None = h5
        self.attrs = {k: _py(v) for k, v in h5.attrs.items()}
        self.num_classes: int = info["num_classes"]
        self.feature_dim: int = info["feature_dim"]
        self.class_counts: np.ndarray = info["class_counts"]
        self.splits: list[str] = list(info["splits"])
        if info["counts_computed"]:
            log.info("%s has no class_counts attribute; computed them from the train labels", path)

    def _group(self, split: str) -> h5py.Group:
        if self._h5 is None:
            raise RuntimeError(f"{self.path}: the feature file is closed")
        if split not in self.splits:
            raise _err(self.path, f"has no split {split!r} (present: {self.splits})",
                       f"Extract that split with tools/extract.py, or use one of {self.splits}")
        return self._h5[split]

    def num_rows(self, split: str) -> int:
        """N, the number of rows of ``split``."""
        return int(self._group(split)["labels"].shape[0])

    def has_logits(self, split: str) -> bool:
        """Whether ``split`` stores the stage-one logits."""
        return "logits" in self._group(split)

    def nbytes(self, split: str) -> int:
        """In-memory size in bytes of ``split``'s features as float32 (N * d * 4)."""
        return self.num_rows(split) * self.feature_dim * 4

    def load(self, split: str, *, rows: slice | None = None, dtype: Any = np.float32) -> FeatureSplit:
        """Read ``split`` (or ``rows`` of it, a slice with positive step) into memory.

        Returns a :class:`FeatureSplit` with features ``dtype`` [n, d] (float16 on disk is
        widened), labels/index int64 [n], logits float32 [n, C] or None. Features and logits
        are checked for NaN/inf block by block.
        """
        g = self._group(split)
        n_all = g["labels"].shape[0]
        start, stop, step = (rows or slice(None)).indices(n_all)
        if step < 1:
            raise ValueError(f"rows must be a slice with a positive step, got {rows}")
        positions = range(start, stop, step)
        n = len(positions)
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        has_logits = "logits" in g
        features = np.empty((n, self.feature_dim), dtype=dtype)
        logits = np.empty((n, self.num_classes), dtype=np.float32) if has_logits else None
        width = self.feature_dim + (self.num_classes if has_logits else 0)
        block = max(1, _READ_BYTES // (4 * width))
        for a in range(0, n, block):
            b = min(n, a + block)
            src = slice(positions[a], positions[b - 1] + 1, step)
            part = g["features"][src]
            with np.errstate(over="ignore"):  # an overflow is reported below, by row
                features[a:b] = part
            # checked after the cast: a float64 dataset, or a narrower dtype asked for, can overflow
            row = first_nonfinite_row(features[a:b])
            if row is not None:
                if np.isfinite(part[row]).all():
                    fix = ("Load it as float32 (dtype=np.float32)" if dtype.itemsize < 4 else
                           "The file holds values no float32 feature can have: re-extract with tools/extract.py")
                    raise _err(self.path, f"split {split!r} row {positions[a + row]}: feature magnitude "
                               f"{float(np.abs(part[row]).max()):.4g} exceeds the range of {dtype}", fix)
                raise _err(self.path, f"split {split!r} row {positions[a + row]}: feature is NaN or inf",
                           "The file is damaged or was written from a diverged model; re-extract "
                           "with tools/extract.py")
            if logits is not None:
                part = g["logits"][src]
                with np.errstate(over="ignore"):
                    logits[a:b] = part
                row = first_nonfinite_row(logits[a:b])
                if row is not None:
                    what = ("exceed the float32 range" if np.isfinite(part[row]).all() else "are NaN or inf")
                    raise _err(self.path, f"split {split!r} row {positions[a + row]}: logits {what}",
                               "Re-extract with tools/extract.py")
        if n:
            sel = slice(start, positions[-1] + 1, step)
            labels = g["labels"][sel].astype(np.int64, copy=False)
            index = g["index"][sel].astype(np.int64, copy=False)
        else:
            labels, index = np.zeros(0, np.int64), np.zeros(0, np.int64)
        return FeatureSplit(features, labels, index, logits, start=start)

    def fingerprint(self, rows: int = 16) -> str:
        """A short hash of what this file holds, independent of its path: C, d, the class counts,
        the root attributes, each split's row count and its first and last ``rows`` rows
        (features, labels, index). Two extractions of the same data by the same model match;
        files of other data or another model do not. Read in well under a second at any size.
        """
        h = hashlib.sha256()
        h.update(repr((self.num_classes, self.feature_dim, self.class_counts.tolist(),
                       sorted((k, repr(v)) for k, v in self.attrs.items()))).encode())
        for split in self.splits:
            n = self.num_rows(split)
            h.update(f"{split}:{n}".encode())
            for sl in sorted({(0, min(n, rows)), (max(0, n - rows), n)}):
                part = self.load(split, rows=slice(*sl))
                for arr in (part.features, part.labels, part.index):
                    h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def iter_chunks(self, split: str, chunk_rows: int) -> Iterator[FeatureSplit]:
        """Stream ``split`` in consecutive blocks of ``chunk_rows`` rows (the last may be
        shorter); memory is bounded by one block. Each block's ``start`` is its first row."""
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        n = self.num_rows(split)
        for a in range(0, n, int(chunk_rows)):
            yield self.load(split, rows=slice(a, min(n, a + int(chunk_rows))))

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> "FeatureFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = {s: self.num_rows(s) for s in self.splits} if self._h5 is not None else "closed"
        return (f"FeatureFile({os.fspath(self.path)!r}, C={self.num_classes}, "
                f"d={self.feature_dim}, splits={sizes})")
