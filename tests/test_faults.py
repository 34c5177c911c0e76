"""Fault tests: real processes killed with SIGKILL, and clear errors that lose nothing.

* an extraction killed mid-way resumes to a file identical to an uninterrupted one;
* while an extraction runs, the final file name never holds a half-written file;
* stage one killed mid-training resumes from last.pt and finishes with one summary row per epoch;
* stage two interrupted while its ω_init candidates train in worker processes stops them all, and
  --resume finishes with the uninterrupted result;
* a checkpoint of another architecture, NaN features, a corrupt .partial, an existing output or
  run folder: each a clear error, and the files already there are unchanged.

(Truncated/corrupt HDF5 files given to the reader are tested in test_features.py, list files
naming missing images in test_data.py.)

Data: a fake Fashion-MNIST (gzip IDX files) written into tmp_path; models are resnet20.
The helpers here are shared with test_distributed.py.
"""
import gzip
import json
import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from glag.data.fmnist import FILES as FMNIST_FILES
from glag.extract import extract_features, shard_path
from glag.features import FeatureFileError, open_features
from glag.stage1 import Stage1Config, load_checkpoint, train_stage1

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"

# --------------------------------------------------------------------------- shared helpers


def make_fake_fmnist(root: Path, train_per_class: int = 40, test_per_class: int = 5, seed: int = 1) -> Path:
    """Write a fake Fashion-MNIST (10 classes, random 28x28 images) as the four gzip IDX files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    ytr = rng.permutation(np.repeat(np.arange(10), train_per_class))
    yte = np.repeat(np.arange(10), test_per_class)
    arrays = {"train_images": rng.randint(0, 256, (len(ytr), 28, 28)), "train_labels": ytr,
              "test_images": rng.randint(0, 256, (len(yte), 28, 28)), "test_labels": yte}
    for key, arr in arrays.items():
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        header = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        with gzip.open(root / FMNIST_FILES[key], "wb", compresslevel=1) as f:
            f.write(header + arr.tobytes())
    return root


# A tiny stage one: 118 train images (counts 30..3), 50 val, resnet20.
TINY = dict(dataset="fmnist-lt", n_max=30, imbalance_factor=10.0, val_per_class=5, arch="resnet20",
            batch_size=16, eval_batch_size=64, progress=False)


def tiny_cli_args(root: Path, out: Path, epochs: int) -> list[str]:
    """The command-line flags of :data:`TINY` (for tools/train_stage1.py)."""
    return ["--data-root", str(root), "--n-max", "30", "--imbalance-factor", "10", "--val-per-class", "5",
            "--arch", "resnet20", "--batch-size", "16", "--eval-batch-size", "64", "--epochs", str(epochs),
            "--out", str(out), "--no-progress", "--threads", "1"]


def train_tiny(root: Path, out: Path, epochs: int = 1, resume: bool = False, **kw) -> Path:
    """Train (or resume) the tiny stage one in this process; returns the run folder."""
    train_stage1(Stage1Config(out=str(out), data_root=str(root), epochs=epochs, **{**TINY, **kw}), resume=resume)
    return out


def tool(name: str, *args, **popen_kw) -> subprocess.Popen:
    """Start ``python tools/<name>.py args...`` as a real process (output to files in cwd)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.Popen([sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)], env=env, **popen_kw)


def run_tool(name: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a tool to completion, capturing its output; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{name} failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-4000:]}"
    return res


def h5_content(path: Path) -> tuple[dict, dict]:
    """Every dataset (as numpy) and every attribute (root and groups) of an HDF5 file."""
    arrays, attrs = {}, {}
    with h5py.File(path, "r") as f:
        attrs["/"] = {k: np.asarray(v) for k, v in f.attrs.items()}

        def visit(name, obj):
            attrs[name] = {k: np.asarray(v) for k, v in obj.attrs.items()}
            if isinstance(obj, h5py.Dataset):
                arrays[name] = (str(obj.dtype), obj[...])

        f.visititems(visit)
    return arrays, attrs


def assert_same_h5(a: Path, b: Path) -> None:
    """Same datasets (names, dtypes, values bit for bit) and same attributes."""
    arr_a, att_a = h5_content(a)
    arr_b, att_b = h5_content(b)
    assert sorted(arr_a) == sorted(arr_b)
    for name in arr_a:
        assert arr_a[name][0] == arr_b[name][0], name
        assert np.array_equal(arr_a[name][1], arr_b[name][1]), name
    assert sorted(att_a) == sorted(att_b)
    for name in att_a:
        assert sorted(att_a[name]) == sorted(att_b[name]), name
        for key in att_a[name]:
            assert np.array_equal(att_a[name][key], att_b[name][key]), (name, key)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    """{file name: sha256} of the files directly in ``folder``."""
    return {p.name: sha(p) for p in sorted(Path(folder).iterdir()) if p.is_file()}


def rows_done(partial: Path) -> int:
    """Rows written so far in an extraction's .partial (0 if unreadable right now)."""
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return sum(int(f[s].attrs["rows_done"]) for s in f if "rows_done" in f[s].attrs)
    except (OSError, KeyError, RuntimeError, ValueError):
        return 0


# --------------------------------------------------------------------------- fixtures


# every test here runs with one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Fake data with a 500-image test split (so an extraction lasts a few seconds) and a
    one-epoch stage-one run on it: (data root, run folder)."""
    base = tmp_path_factory.mktemp("faults")
    root = make_fake_fmnist(base / "fmnist", train_per_class=40, test_per_class=50)
    return root, train_tiny(root, base / "run", epochs=1)


@pytest.fixture(scope="module")
def watched_extraction(tiny_run, tmp_path_factory):
    """An uninterrupted CLI extraction, watched while it runs: (output file, observations).

    Observations: ``seen_partial`` (the .partial was seen while running), ``early`` (the final
    name existed while the process was still running and was not a complete feature file)."""
    _, run = tiny_run
    out = tmp_path_factory.mktemp("watched") / "feats.h5"
    partial = out.with_name(out.name + ".partial")
    proc = tool("extract", "--checkpoint", run / "best.pt", "--out", out, "--batch-size", 8, "--no-progress",
                "--threads", "1", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen_partial, early = False, []
    while proc.poll() is None:
        seen_partial |= partial.exists()
        if out.exists() and proc.poll() is None:
            try:  # present before exit: allowed only as the finished file (renamed at the end)
                with open_features(out) as ff:
                    ff.load("train")
            except Exception as e:  # noqa: BLE001
                early.append(repr(e))
        time.sleep(0.02)
    err = proc.stderr.read().decode()
    assert proc.returncode == 0, err[-3000:]
    return out, {"seen_partial": seen_partial, "early": early}


# --------------------------------------------------------------------------- kills


def test_final_name_never_half_written(watched_extraction):
    out, obs = watched_extraction
    assert obs["seen_partial"], "the extraction was too quick to be watched"
    assert obs["early"] == []
    assert out.exists() and not out.with_name(out.name + ".partial").exists()
    with open_features(out) as ff:
        assert ff.attrs["complete"] is True or ff.attrs["complete"] == 1


def test_extraction_sigkill_resumes_identical(tiny_run, watched_extraction, tmp_path):
    _, run = tiny_run
    reference, _ = watched_extraction
    out = tmp_path / "feats.h5"
    partial = out.with_name(out.name + ".partial")
    args = ("--checkpoint", run / "best.pt", "--out", out, "--batch-size", 8, "--no-progress", "--threads", "1")
    proc = tool("extract", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and rows_done(partial) < 16 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the extraction finished before it could be killed"
    assert not out.exists() and partial.exists()
    done = rows_done(partial)
    assert 16 <= done < 50 + 118 + 500
    res = run_tool("extract", *args)
    assert "resuming" in res.stderr
    assert not partial.exists()
    assert_same_h5(out, reference)


def test_extraction_resumes_after_a_split_that_ends_in_a_short_batch(tiny_run, tmp_path, monkeypatch):
    """Stopped once the train split is complete (118 rows: 14 batches of 8 and one of 6) and the
    next split has begun: the resume skips the finished split (its row count is no whole number
    of batches) and ends with the file an uninterrupted extraction writes."""
    import glag.extract as extract_mod

    _, run = tiny_run
    reference = extract_features(run / "best.pt", tmp_path / "reference.h5", batch_size=8, progress=False)
    real = extract_mod.iterate_outputs
    calls = []

    def stop_in_second_split(*args, **kwargs):
        calls.append(args[1])
        for i, batch in enumerate(real(*args, **kwargs)):
            if len(calls) == 2 and i == 1:
                raise KeyboardInterrupt  # as a Ctrl-C in the second split's second batch
            yield batch

    out = tmp_path / "feats.h5"
    partial = out.with_name(out.name + ".partial")
    monkeypatch.setattr(extract_mod, "iterate_outputs", stop_in_second_split)
    with pytest.raises(KeyboardInterrupt):
        extract_features(run / "best.pt", out, batch_size=8, progress=False)
    with h5py.File(partial, "r") as f:
        assert int(f["train"].attrs["rows_done"]) == len(calls[0]) == 118
        assert int(f["val"].attrs["rows_done"]) == 8
    monkeypatch.setattr(extract_mod, "iterate_outputs", real)
    extract_features(run / "best.pt", out, batch_size=8, progress=False)
    assert not partial.exists()
    assert_same_h5(out, reference)


def test_stage1_sigkill_resumes_and_finishes(tmp_path):
    root = make_fake_fmnist(tmp_path / "fmnist")
    out, epochs = tmp_path / "run", 4
    args = tiny_cli_args(root, out, epochs)
    proc = tool("train_stage1", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and not (out / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "stage one finished before it could be killed"
    killed_at = load_checkpoint(out / "last.pt")["epoch"]
    assert 1 <= killed_at < epochs and not (out / "metrics.json").exists()
    # as the README says: --out and --resume alone, the run's config.json gives the other options
    res = run_tool("train_stage1", "--out", out, "--resume", "--no-progress", "--threads", "1")
    assert f"after epoch {killed_at}" in res.stderr
    metrics = (out / "metrics.json").read_text()
    assert '"selected_on": "val"' in metrics
    assert load_checkpoint(out / "last.pt")["epoch"] == epochs
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,")
    assert [r.split(",")[0] for r in rows[1:]] == [str(e) for e in range(1, epochs + 1)]  # one row per epoch


def test_stage1_stopped_before_its_first_checkpoint_restarts_with_one_row_per_epoch(tmp_path, monkeypatch):
    """Stopped after epoch 1's summary row but before its last.pt: --resume has no checkpoint,
    starts over, and the summary ends with one row per epoch (not epoch 1 twice)."""
    import glag.stage1 as s1

    root = make_fake_fmnist(tmp_path / "fmnist")
    real = s1.atomic_torch_save

    def save(ckpt, path):
        if path.name == "last.pt" and ckpt["epoch"] == 1:
            raise KeyboardInterrupt
        real(ckpt, path)
    monkeypatch.setattr(s1, "atomic_torch_save", save)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(root, tmp_path / "run", epochs=2)
    monkeypatch.setattr(s1, "atomic_torch_save", real)
    summary = tmp_path / "run" / "summary.csv"
    assert not (tmp_path / "run" / "last.pt").exists() and len(summary.read_text().splitlines()) == 2
    train_stage1(Stage1Config(out=str(tmp_path / "run"), data_root=str(root), epochs=2, **TINY), resume=True)
    assert [r.split(",")[0] for r in summary.read_text().splitlines()[1:]] == ["1", "2"]


def test_stage1_resume_with_other_data_options_is_refused(tiny_run, tmp_path):
    """--n-max and --imbalance-factor pick the long-tailed subset: resuming with others would
    train the rest of the run on other images. Refused, naming both, with nothing written."""
    _, run = tiny_run
    before = folder_state(run)
    changed = r"--imbalance-factor: 10\.0 in the run, 2\.0 now; --n-max: 30 in the run, 20 now"
    with pytest.raises(ValueError, match=changed):
        train_stage1(Stage1Config(out=str(run), data_root=str(tiny_run[0]), epochs=1,
                                  **{**TINY, "n_max": 20, "imbalance_factor": 2.0}), resume=True)
    assert folder_state(run) == before


def test_stage1_resume_under_another_process_count_is_refused(tiny_run, tmp_path):
    """A run trained by 2 processes (torchrun) resumed by 1: each process's augmentation stream and
    batch share follow the count, so the result would be neither run's. Refused, naming the
    launch to use; the checkpoint records the count."""
    root, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ck = torch.load(copy / "last.pt", weights_only=False)
    assert ck["world_size"] == 1
    ck["world_size"] = 2
    torch.save(ck, copy / "last.pt")
    before = folder_state(copy)
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\), and this run has 1: .* Resume with "
                                         r"torchrun --nproc_per_node 2"):
        train_tiny(root, copy, epochs=2, resume=True)
    assert folder_state(copy) == before


def test_stage_two_never_writes_into_a_stage_one_run(tiny_run, tmp_path, capsys):
    """``afg_train --out <stage-one run>`` said "pass --resume", and with --resume it trained stage
    two there, overwriting stage one's best.pt. Both, and the reverse, are now refused with a
    message (exit 2), the stage-one folder untouched."""
    from glag.synthetic import write_synthetic_features
    from tools import afg_train, train_stage1

    root, run = tiny_run
    feats = write_synthetic_features(tmp_path / "f.h5", [300, 200, 120, 60, 30, 12, 6, 3], 16, seed=3)
    before = folder_state(run)
    for extra in ([], ["--resume"]):
        assert afg_train.cli(["--features", str(feats), "--out", str(run), "--no-progress", *extra]) == 2
        assert "is a stage-one (tools/train_stage1.py) run, not a stage-two" in capsys.readouterr().err
    assert folder_state(run) == before
    s2 = tmp_path / "s2"
    assert afg_train.cli(["--features", str(feats), "--out", str(s2), "--epochs", "1", "--omega-init", "0.6",
                          "--backend", "torch", "--no-progress", "--no-plots"]) == 0
    before = folder_state(s2)
    assert train_stage1.cli(["--out", str(s2), "--resume", "--data-root", str(root)]) == 2
    assert "is a stage-two (tools/afg_train.py) run, not a stage-one" in capsys.readouterr().err
    assert folder_state(s2) == before


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigkill"])
def test_interrupted_omega_candidates_stop_at_once_and_resume(tmp_path, how):
    """--omega-init auto with candidates in worker processes, stopped by ^C (sent to the whole
    process group, as a terminal does), or by SIGTERM or SIGKILL to the tool alone (kill, a job
    scheduler): the workers stop with the tool (no process keeps writing), the tool says how to
    continue and nothing warns of leaked semaphores, and --resume finishes with the uninterrupted
    result."""
    from glag.synthetic import write_synthetic_features

    feats = write_synthetic_features(tmp_path / "f.h5", [300, 200, 120, 60, 30, 12, 6, 3], 16,
                                     val_per_class=20, test_per_class=40, seed=3)
    args = ["--features", feats, "--epochs", "60", "--omega-grid", "0.6", "0.2", "--omega-workers", "2",
            "--backend", "torch", "--no-plots", "--no-progress"]
    run_tool("afg_train", *args, "--out", tmp_path / "full")
    out = tmp_path / "run"
    proc = tool("afg_train", *args, "--out", out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while proc.poll() is None and not list(out.glob("omega_init/*/last.pt")) and time.time() < deadline:
        time.sleep(0.05)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be interrupted"
    assert time.time() - sent < 15  # it did not wait for the candidates to finish
    if how != "sigkill":
        said = "interrupted" if how == "ctrl-c" else "terminated"
        assert said in err and f"continue with --out {out} --resume" in err and "leaked" not in err, err[-2000:]
        assert proc.returncode == (130 if how == "ctrl-c" else 143)
    folders = sorted(out.glob("omega_init/*"))
    assert folders and not all((f / "metrics.json").exists() for f in folders)
    before = {f.name: folder_state(f) for f in folders}
    time.sleep(2.0)
    assert {f.name: folder_state(f) for f in folders} == before  # no worker left writing
    run_tool("afg_train", *args, "--out", out, "--resume")
    done, full = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "full"))
    for key in ("stage2", "per_class", "omega_selection", "omega_init_selected"):
        assert done[key] == full[key], key


# --------------------------------------------------------------------------- clear errors, nothing lost


def test_checkpoint_of_another_architecture(tiny_run, tmp_path):
    _, run = tiny_run
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["arch"] = "resnet32"  # resnet20 weights labelled resnet32
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    out = tmp_path / "feats.h5"
    with pytest.raises(ValueError, match="do not fit a resnet32"):
        extract_features(bad, out, progress=False)
    assert list(tmp_path.iterdir()) == [bad]  # nothing written
    # resuming a run with another --arch is refused before anything is written
    before = folder_state(run)
    with pytest.raises(ValueError, match="--arch: 'resnet20' in the run, 'resnet32' now"):
        train_stage1(Stage1Config(out=str(run), data_root=str(tiny_run[0]), epochs=2,
                                  **{**TINY, "arch": "resnet32"}), resume=True)
    assert folder_state(run) == before


def test_failed_extraction_keeps_existing_file(tiny_run, watched_extraction, tmp_path):
    _, run = tiny_run
    out = tmp_path / "feats.h5"
    out.write_bytes(watched_extraction[0].read_bytes())
    good = sha(out)
    # without --overwrite: refused up front
    with pytest.raises(FeatureFileError, match="already exists") as refused:
        extract_features(run / "best.pt", out, progress=False)
    assert "Shard files" not in str(refused.value)
    # shards a stopped merge left beside it are named in the refusal
    for r in range(2):
        shard_path(out, r, 2).write_bytes(b"a finished shard")
    with pytest.raises(FeatureFileError, match=r"beside it \(feats\.h5\.rank0of2, feats\.h5\.rank1of2\)"):
        extract_features(run / "best.pt", out, progress=False)
    for r in range(2):
        shard_path(out, r, 2).unlink()
    # NaN features with --overwrite: a clear error, the complete file untouched, the .partial kept
    ckpt = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k in ckpt["model"] if k.endswith("weight") and ckpt["model"][k].ndim == 4)
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(ckpt, nan_ckpt)
    with pytest.raises(FeatureFileError, match="NaN"):
        extract_features(nan_ckpt, out, overwrite=True, progress=False)
    assert sha(out) == good
    partial = out.with_name(out.name + ".partial")
    assert partial.exists()
    # a truncated .partial: an error naming it, the complete file untouched
    partial.write_bytes(partial.read_bytes()[:1000])
    with pytest.raises(FeatureFileError, match=r"feats\.h5\.partial") as err:
        extract_features(nan_ckpt, out, overwrite=True, progress=False)
    # it says the file is corrupt and to delete it, not that another process holds a lock
    assert "corrupt" in str(err.value) and "Delete it" in str(err.value) and "locked" not in str(err.value)
    assert sha(out) == good


def test_new_run_refuses_existing_run_folder(tiny_run):
    root, run = tiny_run
    before = folder_state(run)
    with pytest.raises(FileExistsError, match="--resume"):
        train_tiny(root, run, epochs=1)
    assert folder_state(run) == before


def test_extraction_refuses_bad_options_before_any_work(tiny_run, tmp_path, monkeypatch, capsys):
    """--batch-size 0 or below, a negative --num-workers, --threads 0, and an existing folder as
    --out (even with --overwrite): refused naming the option, before the checkpoint is read and
    before any file is created."""
    import glag.extract as extract_mod
    from glag.errors import UsageError
    from tools.extract import build_parser

    _, run = tiny_run

    def no_work(*a, **kw):
        raise AssertionError("the extraction started before refusing its options")
    monkeypatch.setattr(extract_mod, "load_checkpoint", no_work)
    out = tmp_path / "feats.h5"
    for kw, match in (({"batch_size": 0}, "--batch-size must be an integer >= 1, got 0"),
                      ({"batch_size": -8}, "--batch-size must be an integer >= 1, got -8"),
                      ({"num_workers": -1}, "--num-workers must be an integer >= 0, got -1")):
        with pytest.raises(UsageError, match=match):
            extract_features(run / "best.pt", out, progress=False, **kw)
    folder = tmp_path / "outdir"
    folder.mkdir()
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"outdir: is a folder.*--out"):
            extract_features(run / "best.pt", folder, overwrite=overwrite, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["outdir"] and list(folder.iterdir()) == []
    # the command line refuses them when parsing, naming the option
    for option, value in (("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "x"),
                          ("--num-workers", "-1"), ("--threads", "0"), ("--threads", "-2")):
        with pytest.raises(SystemExit) as stop:
            build_parser().parse_args(["--checkpoint", "c.pt", option, value])
        assert stop.value.code == 2
        assert f"argument {option}: " in capsys.readouterr().err
    args = build_parser().parse_args(["--checkpoint", "c.pt", "--batch-size", "1", "--num-workers", "0",
                                      "--threads", "1"])
    assert (args.batch_size, args.num_workers, args.threads) == (1, 0, 1)


def test_extraction_from_another_copy_of_the_data_is_refused(tiny_run, tmp_path, caplog):
    """The run folder's indices.npz records the samples stage one saw: --data-root pointing at
    another copy of the data whose train/val/test samples differ (same class counts) is refused
    naming both folders, before anything is written; an exact copy is accepted; a checkpoint
    without that record (an older run) gets a warning."""
    from glag.errors import UsageError

    root, run = tiny_run
    recorded = np.load(run / "indices.npz")
    other = make_fake_fmnist(tmp_path / "other", train_per_class=60, test_per_class=50, seed=2)
    fewer_test = make_fake_fmnist(tmp_path / "fewer_test", train_per_class=40, test_per_class=30)
    out = tmp_path / "feats.h5"
    with pytest.raises(UsageError, match=r"indices\.npz") as err:
        extract_features(run / "best.pt", out, data_root=other, progress=False)
    msg = str(err.value)
    assert "train" in msg and str(other) in msg and str(root) in msg and "--data-root" in msg, msg
    with pytest.raises(UsageError, match=r"test split.* 500 .*300|test split.* 300 .*500"):
        extract_features(run / "best.pt", out, data_root=fewer_test, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fewer_test", "other"]
    # an exact copy elsewhere: accepted
    same = make_fake_fmnist(tmp_path / "same", train_per_class=40, test_per_class=50)
    extract_features(run / "best.pt", out, data_root=same, splits=("train",), batch_size=64, progress=False)
    with open_features(out) as ff:
        assert np.array_equal(ff.load("train").index, recorded["train"])
    # a checkpoint without its run folder's record: a warning, not a refusal
    old = tmp_path / "old"
    old.mkdir()
    (old / "best.pt").write_bytes((run / "best.pt").read_bytes())
    with caplog.at_level("WARNING", logger="glag"):
        extract_features(old / "best.pt", tmp_path / "old.h5", data_root=other, splits=("train",), batch_size=64,
                         progress=False)
    assert any("indices.npz" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_extraction_of_a_list_run_reads_the_images_from_data_root(tmp_path, monkeypatch):
    """A list-dataset run trained with --image-root A; the dataset folder (images and list files)
    moves to B: --data-root B is where the images are now, and the extraction reads them there,
    and the list files too, however the run named them (relative to the working folder or to the
    image root, or absolute)."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    first = tmp_path / "A"
    rng = np.random.RandomState(3)
    for split, per_class in (("train", (10, 6, 4)), ("val", (2, 2, 2)), ("test", (2, 2, 2))):
        lines = []
        for c, n in enumerate(per_class):
            (first / f"c{c}").mkdir(parents=True, exist_ok=True)
            for k in range(n):
                rel = f"c{c}/{split}_{k}.png"
                Image.fromarray(rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)).save(first / rel)
                lines.append(f"{rel} {c}")
        (first / f"lt_{split}.txt").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    train_stage1(Stage1Config(out=str(run), dataset="list", train_list="A/lt_train.txt", val_list="lt_val.txt",
                              test_list=str(first / "lt_test.txt"), image_root="A", image_size=16,
                              arch="resnet20", epochs=1, batch_size=8, eval_batch_size=64, progress=False))
    moved = first.rename(tmp_path / "B")
    out = extract_features(run / "best.pt", tmp_path / "feats.h5", data_root=moved, batch_size=8, progress=False)
    recorded = np.load(run / "indices.npz")
    with open_features(out) as ff:
        for split in ("train", "val", "test"):
            assert np.array_equal(ff.load(split).index, recorded[split]), split


def test_stage1_resume_refuses_other_threads_and_another_copy_of_the_data(tmp_path):
    """--threads changes a CPU step's sums, so a resume may not change it; another copy of the
    data with the same class counts (another Fashion-MNIST folder) is refused too, checked
    against the run's indices.npz."""
    from glag.errors import UsageError

    root = make_fake_fmnist(tmp_path / "fmnist")
    other = make_fake_fmnist(tmp_path / "other", seed=7)
    out = train_tiny(root, tmp_path / "run", epochs=1, threads=1)
    with pytest.raises(UsageError, match="--threads: 1 in the run, 2 now"):
        train_tiny(root, out, epochs=2, threads=2, resume=True)
    with pytest.raises(UsageError, match="not the data this run was trained on"):
        train_tiny(other, out, epochs=2, threads=1, resume=True)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


def test_stage1_mistakes_leave_no_folder_and_print_no_traceback(tmp_path, capsys):
    """Missing data and a diverging --lr: a usage error (exit 2 from the command) naming the fix;
    missing data leaves no run folder (it is made once the data are read)."""
    from glag.errors import UsageError
    from tools import train_stage1 as tool_stage1

    out = tmp_path / "x" / "run"
    with pytest.raises(UsageError, match="not found|does not exist|cannot find"):
        train_tiny(tmp_path / "nope", out)
    assert not (tmp_path / "x").exists()
    root = make_fake_fmnist(tmp_path / "fmnist")
    assert tool_stage1.cli(tiny_cli_args(root, tmp_path / "nan", 1) + ["--lr", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "lower --lr" in err and "Traceback" not in err


def test_config_files_are_checked_like_flags(tmp_path, capsys):
    """--config: a value outside an option's choices, a JSON list, a file that is not UTF-8: an
    argparse error (exit 2) naming the file, and no run folder."""
    from tools import train_stage1 as tool_stage1

    cases = {"arch.json": json.dumps({"arch": "bogus"}).encode(), "list.json": b"[1, 2]", "bytes.json": b"\xff\xfe"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit) as exc:
            tool_stage1.main(["--config", str(tmp_path / name), "--out", str(tmp_path / "run")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert name in err and ("is not one of" in err or "not an object" in err or "cannot read" in err), err
    assert not (tmp_path / "run").exists()
