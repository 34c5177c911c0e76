"""The run folder: resolved config, provenance (commit, versions, seed), per-epoch summary, metrics.

Every tool writes one: ``config.json``, ``env.json``, ``summary.csv`` (one row per epoch),
``metrics.json``, plus its checkpoints. Files are written to a temporary name and renamed, so an
interrupted run never leaves a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import importlib.metadata
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .errors import RunExistsError, UsageError
from .options import flag

log = logging.getLogger(__name__)

# the process's umask (read once, at import: setting it is the only way to read it, and that is
# not thread-safe); files written atomically get the mode open() would have given them
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _atomic_replace(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, rename it to ``path``.

    A reader sees the old file or the new one, never a half-written one; the temporary file is
    removed if writing fails (a storage failure is reported by :func:`_naming_write_failures`).
    """
    path = Path(path)
    with _naming_write_failures(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600: readable by its owner only
            write(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def _naming_write_failures(path: Path):
    """Run the body; a storage failure in it (:func:`_is_write_failure`) is raised as
    :func:`write_error`'s usage error, anything else as it is."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if _is_write_failure(exc):
            raise write_error(path, exc) from exc
        raise


# what a failed write looks like: the file system's errors, and torch.save's writer reporting one
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
_TORCH_WRITER_FAILURES = ("inline_container", "PytorchStreamWriter", "unexpected pos", "iostream error")


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc``, raised while writing a file, is the storage failing (a full disk, a quota,
    a read-only or failing device), not a bug elsewhere (a CUDA fault met by torch.save's copy)."""
    if isinstance(exc, OSError):
        return exc.errno in _WRITE_ERRNOS
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITER_FAILURES)


def write_error(path: Path, exc: BaseException) -> UsageError:
    """A failed write of ``path`` as a :class:`UsageError` naming the file, the cause and the space
    left on its file system (a full disk is the usual cause; the run resumes once there is room)."""
    try:
        st = os.statvfs(Path(path).parent)
        free = f"; {st.f_bavail * st.f_frsize / 2**20:.1f} MiB free on its file system"
    except (OSError, AttributeError):
        free = ""
    return UsageError(f"could not write {path} ({type(exc).__name__}: {str(exc).strip() or 'no detail'}){free}. "
                      f"If the disk is full, free space and run the same command with --resume (or move the "
                      f"run's folder to a disk with room and resume it there): the run continues from its last "
                      f"complete checkpoint")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    _atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def _finite_or_null(x):
    """``x`` with every NaN or infinite float as None: JSON has no NaN (Python's json writes a bare
    ``NaN`` that other readers refuse); a metric of an empty group reads back as null."""
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite_or_null(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def atomic_write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically; NaN and inf are written as null."""
    text = json.dumps(_finite_or_null(obj), indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` atomically: a checkpoint is whole or absent."""
    _atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def torch_load_checked(path: Path, fix: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` of a checkpoint, a damaged file refused by name.

    Raises:
        UsageError: the file cannot be read (truncated, not a checkpoint), with ``fix``.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a corrupt file
        # the unpickler's own reason, without torch's advice around it (to load with weights_only=False:
        # not for a file we cannot vouch for)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Weights only load failed"):
            lines = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))]
        detail = lines[0][:300] if lines else "no detail"
        raise UsageError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {detail}); it may be "
                         f"truncated, or another kind of file: {fix}") from exc


def check_resume_options(saved: dict, current: dict, where, free=(), warn=("epochs",), fix: str | None = None) -> None:
    """Refuse to resume the run at ``where`` with options that change what it computes.

    saved: the options the run was started with (its checkpoint's or config.json); current:
    this command's. Options in ``free`` (paths, threads, progress: how, not what) may differ;
    so may those in ``warn`` (``--epochs``: continue a run to a new length), which the caller
    checks and warns of once it knows the run's progress (:func:`continue_epochs`: a warning
    before a refusal would contradict it). An option missing on either side is not compared.
    ``fix``: the message's last sentence, what to do instead (default: for ``--resume``).

    Raises:
        UsageError: naming each option that differs, with both values, and the fix.
    """
    def norm(v):  # tuples and lists alike, as config.json stores them
        return json.loads(json.dumps(v, default=_jsonable))

    diff = [k for k in sorted(set(saved) & set(current))
            if k not in free and k not in warn and norm(saved[k]) != norm(current[k])]
    if diff:
        details = "; ".join(f"{flag(k)}: {saved[k]!r} in the run, {current[k]!r} now" for k in diff)
        raise UsageError(f"{where} was started with other options ({details}). " + (
            fix or "Resume with the run's own options (--resume alone reads them from the run's config.json) or "
                   "choose another --out"))


def continue_epochs(run: "RunDir", epochs: int, done: int, write: bool = True) -> None:
    """A resumed run's ``--epochs``: refused below the epochs it has done; a new value is written
    into its ``config.json`` (the folder describes the run as it ends; ``write=False``: check only,
    for the processes of a distributed run other than the one that writes).

    Raises:
        UsageError: ``epochs < done``, naming both and the fix.
    """
    if epochs < done:
        raise UsageError(f"{run.path} has trained {done} epochs already; --epochs {epochs} is fewer. Resume with "
                         f"--epochs {done} or more, or choose another --out")
    path = run / "config.json"
    if write and path.exists():
        saved = json.loads(path.read_text())
        if saved.get("epochs", epochs) != epochs:
            log.warning("resuming %s with --epochs %d (it was started with %d): the schedules follow the new value "
                        "from here on, so the result differs from an uninterrupted run with it", run.path, epochs,
                        saved["epochs"])
            atomic_write_json(path, {**saved, "epochs": epochs})


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit of the glag source tree (with ``-dirty`` when modified), or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(seed: int | None = None) -> dict:
    """Provenance of a run: glag version and commit, package versions, Python, platform, seed."""
    import glag

    versions = {}
    # read installed versions from package metadata: importing faiss or cupy here would be slow
    for name, dists in (("torch", ["torch"]), ("numpy", ["numpy"]), ("numba", ["numba"]),
                        ("faiss", ["faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"]), ("h5py", ["h5py"]),
                        ("cupy", ["cupy-cuda12x", "cupy-cuda11x", "cupy"])):
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = f"{importlib.metadata.version(dist)} ({dist})"
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return {
        "glag": glag.__version__,
        "commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "argv": sys.argv,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's global state and torch (library code uses its own generators too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RUN_KINDS = {"stage1": "stage-one (tools/train_stage1.py)", "stage2": "stage-two (tools/afg_train.py)"}


def run_kind_of(config: dict) -> str | None:
    """The kind of run a ``config.json`` describes: its ``run_kind``, or for runs written before
    that was recorded, told from their options (stage two's name a feature file, stage one's an
    architecture); None if neither."""
    kind = config.get("run_kind")
    if kind is None:
        kind = "stage2" if "features" in config else "stage1" if "arch" in config else None
    return kind


def check_run_kind(config: dict, kind: str | None, where) -> None:
    """Refuse to continue (or to reuse the options of) a run of another kind: a stage-two run
    resumed in a stage-one folder would overwrite its checkpoint and metrics."""
    other = run_kind_of(config)
    if kind is not None and other is not None and other != kind:
        raise RunExistsError(f"{where} is a {RUN_KINDS.get(other, other)} run, not a {RUN_KINDS[kind]} one: its "
                             f"options are not this tool's, and writing this run there would overwrite it. Give this "
                             f"run its own --out (and --config a {RUN_KINDS[kind].split()[0]} run's config.json)")


class _FolderLock:
    """An exclusive ``flock`` on the run folder itself while a run writes it: a second process (a
    resume started while the run, or a worker it left, still writes) is refused instead of
    interleaving its rows and checkpoints with the first's. The kernel drops the lock when the
    process ends, even by SIGKILL, so a killed run never leaves a stale one, and no lock file is
    left in the folder. Re-entrant within a process (a notebook that resumes a run it interrupted
    still holds that run's lock)."""

    _held: dict = {}  # real path -> [descriptor, holders]

    def __init__(self, key: str):
        self.key = key

    @classmethod
    def acquire(cls, folder: Path) -> "_FolderLock | None":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return None
        key = os.path.realpath(folder)
        if key in cls._held:
            cls._held[key][1] += 1
            return cls(key)
        fd = os.open(key, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system without locks (NFS, FUSE)
                log.warning("cannot lock the run folder %s (%s): two processes writing it at once would not be "
                            "stopped", folder, exc.strerror or exc)
                return None
            raise UsageError(f"another process is writing the run folder {folder} now (the run, or a resume of "
                             f"it, is still going); wait for it to finish, or stop it and resume, or choose "
                             f"another --out") from None
        cls._held[key] = [fd, 1]
        return cls(key)

    def release(self) -> None:
        entry = self._held.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[self.key]
            os.close(entry[0])  # closing the descriptor drops the flock


class RunDir:
    """A run folder. ``RunDir(path)`` creates it; ``resume=True`` accepts an existing one.

    Nothing that is not the run's is ever overwritten: a new run needs a folder that does not
    exist or is empty. A folder that holds a run (its ``marker``) needs ``resume=True``; one that
    holds other files (hidden ones aside) is refused either way (:class:`glag.errors.RunExistsError`),
    and so is a path that is a file (:class:`glag.errors.UsageError`).
    """

    def __init__(self, path, *, resume: bool = False, marker: str = "config.json", create: bool = True,
                 kind: str | None = None):
        """Check ``path`` for a new run (or, with ``resume``, an existing one); with ``create``, also
        :meth:`create` it (``create=False``: check now, create once the inputs have been read).
        ``kind`` (a key of :data:`RUN_KINDS`): recorded in config.json, and a run of another kind
        there is refused (:func:`check_run_kind`)."""
        self.path, self.resume, self.kind, self.marker = Path(path), resume, kind, marker
        self._lock = None
        self._check()
        if create:
            self.create()

    def _check(self) -> None:
        """The checks of :meth:`__init__` (run again by :meth:`create` under the lock)."""
        marker = self.marker
        if self.kind is not None and (self.path / marker).is_file():
            try:
                saved = json.loads((self.path / marker).read_text())
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict):
                check_run_kind(saved, self.kind, self.path)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file; a run needs a folder: choose another --out")
        if self.path.is_dir() and not (self.path / marker).exists():
            # hidden names are not the user's work (and include a killed atomic write's temporary file)
            others = sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))
            if others:  # not a run of ours either: each writes its config.json before anything else
                shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
                raise RunExistsError(f"--out {self.path} is not empty ({shown}) and holds no run (no {marker}); "
                                     f"its files would be overwritten: choose a new or empty folder")
        elif self.path.is_dir() and not self.resume:
            raise RunExistsError(
                f"{self.path} already holds a run; pass --resume to continue it or choose another --out")
        if self.resume and not (self.path / marker).exists():
            raise UsageError(f"--resume: {self.path} holds no run to continue (no {marker}); check --out, or "
                             f"start the run without --resume")

    def create(self) -> None:
        """Make the folder (and check it can be written), take the folder's lock and check it
        again under the lock (another run may have taken it since :meth:`__init__`, while this
        one read its data); when resuming, remove the temporary files of atomic writes a killed
        run left."""
        existed = self.path.is_dir()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-test.")  # writable (root ignores modes)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:  # a parent that is a file, no permission, a read-only file system, ...
            raise UsageError(f"cannot write the run folder --out {self.path}: {exc.strerror or exc}; "
                             f"choose another --out") from exc
        lock = _FolderLock.acquire(self.path)  # before the sweep below: another writer's files
        try:
            self._check()
        except BaseException:
            if lock is not None:
                lock.release()
            if not existed:  # the folder this call made, if it is still empty (never another run's files)
                try:
                    os.rmdir(self.path)
                except OSError:
                    pass
            raise
        self._lock = lock
        # what discard_new() may remove: only what this run writes from here on
        self._existed, self._before = existed, {p.name for p in self.path.iterdir()}
        if self.resume:
            for tmp in self.path.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)

    def discard_new(self) -> None:
        """Remove what a new run (``resume=False``) wrote, when it is refused before its first
        checkpoint (data found damaged when first read, say), so that the same command runs once
        the input is fixed. Safe by construction: a new run's folder was absent, or empty but for
        hidden files, which are kept (as is the folder then)."""
        if self.resume or self._lock is None or not self.path.is_dir():  # (created by this process only)
            return
        if not self._existed:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        for p in self.path.iterdir():
            if p.name in self._before:
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def release(self) -> None:
        """Let other processes write the folder (the lock :meth:`create` took; also released when
        this object is collected, or when the process ends, however it ends)."""
        lock, self._lock = getattr(self, "_lock", None), None
        if lock is not None:
            lock.release()

    def __del__(self):
        self.release()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict, seed: int | None = None) -> None:
        if self.kind is not None:
            config = {**config, "run_kind": self.kind}
        atomic_write_json(self.path / "config.json", config)
        atomic_write_json(self.path / "env.json", environment(seed))

    def write_metrics(self, metrics: dict) -> None:
        atomic_write_json(self.path / "metrics.json", metrics)

    def append_summary(self, row: dict, name: str = "summary.csv") -> None:
        """Append one row (an epoch) to ``summary.csv``; the header comes from the first row."""
        path = self.path / name
        new = not path.exists()
        # a row cut short by a full disk is dropped when the run resumes (truncate_summary)
        with _naming_write_failures(path), open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    def truncate_summary(self, epochs_done: int, name: str = "summary.csv") -> None:
        """Keep the header and the first ``epochs_done`` rows (a resumed run rewrites later ones)."""
        path = self.path / name
        if not path.exists():
            return
        lines = path.read_text().splitlines(keepends=True)
        atomic_write_bytes(path, "".join(lines[: 1 + epochs_done]).encode())
