"""Scale: torchrun stage one (DDP, gloo on CPU), sharded extraction, float16 storage.

The multi-process tests start real ``torchrun --standalone --nproc_per_node 2`` runs (as
``python -m torch.distributed.run``) of the tools on a fake Fashion-MNIST in tmp_path; the rest
tests the pieces in one process (rank sharding of batches and splits, the shard merge), and
float16 feature storage through a real extraction (half the feature bytes, read back as float32).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from glag import distributed
from glag.data.base import (SubsetSplit, TensorSplit, batch_seed, iterate_batches, num_batches, shard_bounds,
                            shard_split)
from glag.extract import extract_features, merge_shards, shard_path
from glag.features import FeatureFileError, FeatureWriter, open_features
from glag.stage1 import load_checkpoint

from test_faults import TOOLS, assert_same_h5, make_fake_fmnist, rows_done, tiny_cli_args


def torchrun(tool: str, *args, nproc: int = 2, timeout: float = 300, **popen_kw):
    """``python -m torch.distributed.run --standalone --nproc_per_node N tools/<tool>.py args``;
    with ``popen_kw`` a started Popen (own session, to kill the whole group), else the finished
    CompletedProcess (asserted successful)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(TOOLS / f"{tool}.py"), *map(str, args)]
    if popen_kw:
        return subprocess.Popen(cmd, env=env, start_new_session=True, **popen_kw)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"torchrun {tool} failed ({res.returncode}):\n{res.stdout}\n{res.stderr[-5000:]}"
    return res


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun we started and its workers (torchrun starts them in their own
    sessions, so killing its process group is not enough): the agent first, so it cannot react."""
    todo, tree = [proc.pid], []
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += _children(pid)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in tree[1:]) and time.time() < deadline:
        time.sleep(0.05)


def tensor_split(n: int, seed: int = 0) -> TensorSplit:
    rng = np.random.RandomState(seed)
    return TensorSplit("train", rng.randint(0, 256, (n, 1, 8, 8)).astype(np.uint8), rng.randint(0, 3, n),
                       np.arange(100, 100 + n), mean=(0.5,), std=(0.25,), pad=2)


# --------------------------------------------------------------------------- one process


# every test here runs with one torch thread (see conftest.one_torch_thread)
pytestmark = pytest.mark.usefixtures("one_torch_thread")



def test_single_process_helpers(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init_from_env() == (0, 1)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert not distributed.is_distributed()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    distributed.barrier()
    distributed.cleanup()
    assert distributed.device() == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_from_env()


@pytest.mark.parametrize("world", [2, 3])
def test_iterate_batches_rank_shards(world):
    split, bs = tensor_split(23), 6
    ref = list(iterate_batches(split, bs, shuffle=True, augment=True, seed=5, epoch=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(ref, iterate_batches(
        split, bs, shuffle=True, augment=True, seed=5, epoch=2, rank=0, world_size=1)))
    per_rank = [list(iterate_batches(split, bs, shuffle=True, augment=True, seed=5, epoch=2, rank=r,
                                     world_size=world)) for r in range(world)]
    nb = num_batches(split, bs)
    assert [len(p) for p in per_rank] == [nb] * world
    first = ref[0][2].tolist()
    for b in range(nb):
        parts = [p[b][2].tolist() for p in per_rank]
        assert len({len(q) for q in parts}) == 1  # every rank: the same batch size
        glued = sum(parts, [])
        want = ref[b][2].tolist()
        assert glued[:len(want)] == want  # the global batch, split contiguously
        assert glued[len(want):] == first[:len(glued) - len(want)]  # padded from the epoch's start
    # per-rank augmentation: rank 1 augments with seed + 1, not with rank 0's seed
    x1, rows = per_rank[1][0][0], per_rank[1][0][2].numpy() - 100
    assert torch.equal(x1, split.load_batch(rows, True, batch_seed(5 + 1, 2, 0)))
    assert not torch.equal(x1, split.load_batch(rows, True, batch_seed(5, 2, 0)))


def test_shard_split_bounds():
    split = tensor_split(23)
    for n in (1, 7, 23, 24):
        for bs in (1, 4, 8):
            for world in (1, 2, 3, 5):
                bounds = [shard_bounds(n, r, world, bs) for r in range(world)]
                assert bounds[0][0] == 0 and bounds[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
                assert all(lo % bs == 0 for lo, _ in bounds)
    part = shard_split(split, 1, 2, 8)
    assert isinstance(part, SubsetSplit) and part.index.tolist() == list(range(108, 123))  # batches 1, 2 of 3
    assert torch.equal(part.load_batch(np.arange(3), False, 0), split.load_batch(np.arange(8, 11), False, 0))
    assert shard_split(split, 0, 1, 8) is split


def _write(path, rows, seed):
    rng = np.random.RandomState(seed)
    n = len(rows)
    with FeatureWriter(path, split_sizes={"train": n}, feature_dim=4, num_classes=3,
                       attrs={"dataset": "t", "checkpoint_sha256": "x"}) as w:
        w.append("train", rng.randn(n, 4).astype(np.float32), np.asarray(rows) % 3, np.asarray(rows),
                 rng.randn(n, 3).astype(np.float32))
        return w.finalize()


def test_merge_shards_checks_order(tmp_path):
    a, b = _write(tmp_path / "s0.h5", range(0, 5), 0), _write(tmp_path / "s1.h5", range(5, 9), 1)
    attrs = {"dataset": "t", "checkpoint_sha256": "x"}
    kw = dict(attrs=attrs, feature_dim=4, num_classes=3)
    with pytest.raises(FeatureFileError, match="do not fit together"):
        merge_shards(tmp_path / "bad.h5", [b, a], {"train": np.arange(9)}, **kw)
    merged = merge_shards(tmp_path / "m.h5", [a, b], {"train": np.arange(9)}, chunk_rows=2, **kw)
    with open_features(merged) as m, open_features(a) as fa, open_features(b) as fb:
        got = m.load("train")
        assert got.index.tolist() == list(range(9))
        assert np.array_equal(got.features, np.concatenate([fa.load("train").features, fb.load("train").features]))
    assert shard_path(tmp_path / "f.h5", 1, 4).name == "f.h5.rank1of4"


# --------------------------------------------------------------------------- torchrun, 2 processes


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 2-process stage one (gloo), one epoch: (data root, run folder, torchrun's stderr)."""
    base = tmp_path_factory.mktemp("ddp")
    root = make_fake_fmnist(base / "fmnist")
    out = base / "run"
    res = torchrun("train_stage1", *tiny_cli_args(root, out, epochs=1))
    return root, out, res.stderr


def test_ddp_stage1_two_processes(ddp_run):
    import json

    _, out, log = ddp_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["batch_size"], metrics["batch_size_per_process"]) == (2, 16, 8)
    assert metrics["selected_on"] == "val" and 0 <= metrics["test"]["top1"] <= 100
    assert "2 process(es) x 8 images = effective batch 16 (global)" in log
    assert log.count("epoch 1/1 loss") == 1  # only rank 0 logs at INFO
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,")
    for name in ("best.pt", "last.pt"):
        ckpt = load_checkpoint(out / name)
        assert not any(k.startswith("module.") for k in ckpt["model"])
    assert not list(out.glob(".*.tmp"))


def test_sharded_extraction_equals_single(ddp_run, tmp_path):
    _, out, _ = ddp_run
    merged = tmp_path / "sharded.h5"
    torchrun("extract", "--checkpoint", out / "best.pt", "--out", merged, "--batch-size", 16, "--no-progress")
    single = extract_features(out / "best.pt", tmp_path / "single.h5", batch_size=16, progress=False)
    assert_same_h5(merged, single)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sharded.h5", "single.h5"]  # shards deleted


def test_float16_extraction_half_size(ddp_run, tmp_path):
    _, run, _ = ddp_run
    f32 = extract_features(run / "best.pt", tmp_path / "f32.h5", batch_size=32, progress=False)
    f16 = extract_features(run / "best.pt", tmp_path / "f16.h5", batch_size=32, dtype="float16", progress=False)
    with h5py.File(f32) as a, h5py.File(f16) as b:
        for split in ("train", "val", "test"):
            assert b[split]["features"].dtype == np.float16
            assert b[split]["features"].id.get_storage_size() * 2 == a[split]["features"].id.get_storage_size()
    # the file shrinks by half the float32 features' bytes (logits stay float32; HDF5's own
    # metadata, ~50 KB, dominates a file this small, so compare the difference)
    with open_features(f32) as a:
        feature_bytes = sum(a.nbytes(s) for s in a.splits)
    assert abs((f32.stat().st_size - f16.stat().st_size) - feature_bytes / 2) <= 4096
    with open_features(f32) as a, open_features(f16) as b:
        for split in ("train", "test"):
            x32, x16 = a.load(split), b.load(split)
            assert x16.features.dtype == np.float32
            np.testing.assert_allclose(x16.features, x32.features, rtol=1e-3, atol=1e-4)
            assert np.array_equal(x16.logits, x32.logits) and np.array_equal(x16.index, x32.index)


@pytest.mark.slow
def test_ddp_resume(ddp_run, tmp_path):
    import shutil

    root, out, _ = ddp_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    res = torchrun("train_stage1", *tiny_cli_args(root, run, epochs=2), "--resume")
    assert "after epoch 1" in res.stderr
    rows = (run / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert load_checkpoint(run / "last.pt")["epoch"] == 2


@pytest.mark.slow
def test_sharded_extraction_sigkill_resumes(ddp_run, tmp_path):
    root, out, _ = ddp_run
    big = tmp_path / "big"
    make_fake_fmnist(big, train_per_class=40, test_per_class=40)
    merged = tmp_path / "feats.h5"
    # out's checkpoint names the small data's class counts; the big fake has the same train draw but
    # more test images, which extraction refuses against the run's indices.npz: a copy of the
    # checkpoint outside its run folder is not checked (a warning), and has more rows to kill in
    ckpt = tmp_path / "moved" / "best.pt"
    ckpt.parent.mkdir()
    shutil.copy(out / "best.pt", ckpt)
    args = ("--checkpoint", ckpt, "--out", merged, "--batch-size", 8, "--no-progress", "--data-root", big)
    proc = torchrun("extract", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partials = [merged.with_name(shard_path(merged, r, 2).name + ".partial") for r in range(2)]
    deadline = time.time() + 120  # both shards past creation, with rows written
    while proc.poll() is None and min(rows_done(p) for p in partials) < 16 and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc)
    assert proc.returncode != 0 and not merged.exists() and all(p.exists() for p in partials)
    torchrun("extract", *args)
    single = extract_features(ckpt, tmp_path / "single.h5", batch_size=8, data_root=big, progress=False)
    assert_same_h5(merged, single)
