"""Stage two in bounded memory (glag.streaming): the path choice, the one-pass statistics, the
streamed epoch, accuracy and resume against the in-memory path, and peak memory in a subprocess."""
import json
import logging
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch

from glag import afg
from glag.stage2 import EpochBuilder, Stage2Config, load_splits, train_stage2
from glag.streaming import (H5Rows, StreamingData, StreamingEpochBuilder, choose_data_path, parse_bytes,
                            plan_streaming)
from glag.features import FeatureFileError, open_features
from glag.synthetic import write_synthetic_features
from test_stage2 import _run_epochs  # the shared interrupt-after-n-epochs helper

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COUNTS = [300, 200, 120, 60, 30, 12, 6, 3]  # head (> 100): classes 0-2; d = 16 < 120: Cholesky factors
TINY = "1K"  # far below anything: the streaming path, with its smallest buffers


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "feats.h5"
    return write_synthetic_features(path, COUNTS, 16, val_per_class=20, test_per_class=40, seed=3, separation=1.0)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """d = 256 > every head count: the head factors are the centred rows themselves (gathered)."""
    path = tmp_path_factory.mktemp("wide") / "wide.h5"
    return write_synthetic_features(path, [160, 130, 110, 40, 8, 2, 1], 256, val_per_class=5, test_per_class=5,
                                    seed=5)


def cfg(feats, out, **kw):
    base = dict(features=str(feats), out=str(out), epochs=4, batch_size=128, backend="torch", progress=False,
                omega_init=0.6)
    base.update(kw)
    return Stage2Config(**base)


def test_parse_bytes():
    assert parse_bytes("4G") == 4 * 2**30 and parse_bytes("4GB") == parse_bytes("4GiB") == 4 * 2**30
    assert parse_bytes("512M") == 512 * 2**20 and parse_bytes("1.5k") == 1536 and parse_bytes(1000) == 1000
    assert parse_bytes("1000") == 1000
    for bad in ("4Q", "", "-1G", "0", "G"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    assert Stage2Config(max_memory="2M").resolved().max_memory == 2 * 2**20


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_streaming_statistics_equal_class_statistics(offset):
    """Any chunking and row order; n_c <= d (gathered), n_c > d (Chan merge), n_c = 1; a large
    common offset (the naive sum-of-squares formula would cancel there)."""
    rng = np.random.default_rng(0)
    counts = np.array([300, 40, 17, 16, 3, 1, 2, 120])
    d = 16
    y = np.repeat(np.arange(len(counts)), counts)
    centres = rng.standard_normal((len(counts), d)) * 5
    x = (offset + centres[y] + rng.standard_normal((len(y), d)) * rng.uniform(0.5, 2, d)).astype(np.float32)
    perm = rng.permutation(len(y))
    x, y = torch.from_numpy(x[perm]), torch.from_numpy(y[perm])
    ref = afg.class_statistics(x, y, len(counts))
    chunks = [(x[a:a + 101], y[a:a + 101]) for a in range(0, len(y), 101)]
    st = afg.streaming_class_statistics(iter(chunks), len(counts), counts)
    assert torch.allclose(st.means, ref.means, rtol=1e-6, atol=1e-6 * (1 + offset))
    assert st.bank.ranks.tolist() == ref.bank.ranks.tolist() == [16, 16, 16, 16, 3, 0, 2, 16]
    for c in range(len(counts)):
        a, b = st.covariance(c), ref.covariance(c)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()) + 1e-12), c
    # only the requested (head) classes get a factor; the bank's transpose is free (no copy)
    head = afg.streaming_class_statistics(iter(chunks), len(counts), counts, factor_classes=[0, 7, 4])
    assert head.bank.ranks.tolist() == [16, 0, 0, 0, 3, 0, 0, 16]
    assert torch.allclose(head.covariance(7), ref.covariance(7), rtol=1e-5, atol=1e-9)
    assert head.bank.transposed("cpu").data_ptr() == head.bank.data.data_ptr()
    with pytest.raises(ValueError, match="do not match"):
        afg.streaming_class_statistics(iter(chunks), len(counts), counts + 1)


@pytest.mark.parametrize("which", ["feats", "wide"])
def test_statistics_pass_matches_the_in_memory_builder(which, request):
    path = request.getfixturevalue(which)
    ff, splits = load_splits(path, 0.5)
    c = Stage2Config(features=str(path), backend="torch", max_memory=TINY, stream_block_rows=8,
                     omega_init=0.6).resolved()
    mem = EpochBuilder(c, splits["train"], ff.class_counts)
    plan = plan_streaming(ff, c, parse_bytes(TINY))
    reader = H5Rows(path)
    st = StreamingEpochBuilder(c, reader, ff.class_counts, plan)
    assert torch.allclose(st.stats.means, mem.stats.means, rtol=1e-6, atol=1e-6)
    for k in range(len(ff.class_counts)):
        if st.is_head[k]:
            a, b = st.stats.covariance(k), mem.stats.covariance(k)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max())), k
        else:
            assert int(st.stats.bank.ranks[k]) == 0  # never a support class: no factor kept
    assert torch.equal(st.tail_ids, mem.tail_ids) and st.resample_ids == mem.resample_ids
    assert torch.equal(st.support, mem.support)
    # FAISS distances are ||q||^2 + ||mu||^2 - 2 q.mu in float32: a last-bit change of a mean moves them
    assert torch.allclose(st.weights, mem.weights, rtol=1e-3, atol=1e-4)
    assert np.array_equal(st.qlabels, splits["train"].y[mem.seed_rows].numpy())
    reader.close()


def test_streamed_epoch_is_balanced_and_aligned(feats):
    """C·n_max samples, n_max a class; KD only on real head rows, with their own teacher logits."""
    c = Stage2Config(features=str(feats), backend="torch", max_memory=TINY, stream_block_rows=64,
                     batch_size=100, omega_init=0.6).resolved()
    with open_features(feats) as ff:
        data = StreamingData(c, ff, plan_streaming(ff, c, parse_bytes(TINY)))
        train = ff.load("train")
    # a feature row identifies its file row (continuous features): map it to its logits
    x_t = afg.tukey(torch.from_numpy(train.features), 0.5)
    logits_of = {row.numpy().tobytes(): train.logits[i] for i, row in enumerate(x_t)}
    assert len(data.builder._granules) > 4 and data.builder._per_block >= 2
    batches, info = data.epoch_batches(0, None, torch.Generator().manual_seed(0), 100, use_kd=True)
    ys, sizes, n_kd = [], [], 0
    for xb, yb, mb, tb in batches:
        assert torch.isfinite(xb).all()
        sizes.append(len(yb))
        ys.append(yb)
        assert mb.sum() == (0 if tb is None else len(tb))
        assert bool(data.builder.is_head[yb[mb]].all())
        for row, t in zip(xb[mb], tb if tb is not None else []):
            assert np.array_equal(logits_of[row.numpy().tobytes()], t.numpy())
        n_kd += int(mb.sum())
    y = torch.cat(ys)
    assert np.bincount(y.numpy()).tolist() == [300] * len(COUNTS)
    assert all(s == 100 for s in sizes[:-1]) and sum(sizes) == 300 * len(COUNTS)
    assert n_kd == 300 + 200 + 120  # every real head row once, no copy, no generated row
    assert info["data"] > 0
    data.close()


def test_tiny_budget_streams_and_trains_like_in_memory(feats, tmp_path, caplog):
    mem = train_stage2(cfg(feats, tmp_path / "mem", method="glag", epochs=6))
    with caplog.at_level(logging.INFO, logger="glag.stage2"):
        st = train_stage2(cfg(feats, tmp_path / "st", method="glag", epochs=6, max_memory=TINY, stream_block_rows=64))
    assert mem["data_path"] == "memory" and st["data_path"] == "streaming"
    assert any("data path: streaming" in r.message and "exceeds the budget" in r.message for r in caplog.records)
    saved = json.loads((tmp_path / "st" / "config.json").read_text())
    assert saved["data_path"] == "streaming" and saved["stream_plan"]["block_rows"] == 64
    assert st["stage1"] == mem["stage1"]  # the teacher's predictions, streamed
    for split in ("val", "test"):
        assert abs(st["stage2"][split]["top1"] - mem["stage2"][split]["top1"]) < 6.0, (st["stage2"], mem["stage2"])
    assert st["stage2"]["test"]["top1"] > 60.0  # far above chance (12.5 %)
    rows = (tmp_path / "st" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 6 and ",2400," in rows[1]  # every epoch holds C·n_max samples
    om = json.loads((tmp_path / "st" / "omega.json").read_text())
    assert np.array(om["history"]).shape == (7, len(COUNTS))


def test_a_budget_that_fits_keeps_the_in_memory_path(feats, tmp_path):
    with open_features(feats) as ff:
        choice = choose_data_path(ff, Stage2Config(features=str(feats), max_memory="64G").resolved())
    assert not choice.stream and "fits the budget" in choice.reason
    a = train_stage2(cfg(feats, tmp_path / "a", epochs=2))
    b = train_stage2(cfg(feats, tmp_path / "b", epochs=2, max_memory="64G"))
    assert b["data_path"] == "memory" and a["stage2"] == b["stage2"] and a["per_class"] == b["per_class"]


@pytest.mark.parametrize("method", ["crt", "dc"])
def test_other_methods_stream(feats, tmp_path, method):
    m = train_stage2(cfg(feats, tmp_path / method, method=method, epochs=2, max_memory=TINY, stream_block_rows=48))
    assert m["data_path"] == "streaming" and m["stage2"]["test"]["top1"] > 40.0


def test_wide_file_with_a_one_sample_class_streams(wide, tmp_path):
    m = train_stage2(cfg(wide, tmp_path / "w", epochs=2, max_memory=TINY, stream_block_rows=16))
    assert m["data_path"] == "streaming" and np.isfinite(m["stage2"]["test"]["top1"])


def test_streaming_resume_continues_to_the_same_result(feats, tmp_path):
    kw = dict(epochs=4, max_memory=TINY, stream_block_rows=64)
    full = train_stage2(cfg(feats, tmp_path / "full", **kw))
    part = cfg(feats, tmp_path / "part", **kw)
    import glag.streaming as st

    _run_epochs(part, 2, st.StreamingEpochBuilder, "plan_epoch")
    resumed = train_stage2(part, resume=True)
    assert resumed["stage2"] == full["stage2"] and resumed["data_path"] == "streaming"
    assert len((tmp_path / "part" / "summary.csv").read_text().strip().splitlines()) == 1 + 4


def test_streaming_refuses_nan_features(tmp_path):
    path = write_synthetic_features(tmp_path / "nan.h5", COUNTS, 8, val_per_class=5, test_per_class=5, seed=1)
    with h5py.File(path, "r+") as f:
        f["train/features"][500, 3] = np.nan
    with pytest.raises(FeatureFileError, match="row 500"):
        H5Rows(path).features("train", 0, 731)


def test_afg_train_cli_streams_with_max_memory(feats, tmp_path):
    from glag.tools.afg_train import main

    out = tmp_path / "cli"
    assert main(["--features", str(feats), "--out", str(out), "--epochs", "1", "--max-memory", "1K",
                 "--stream-block-rows", "64", "--backend", "torch", "--no-plots", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["max_memory"] == 1024 and saved["data_path"] == "streaming"


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from glag.streaming import peak_rss_bytes, reset_peak_rss, rss_bytes
    from glag.stage2 import Stage2Config, train_stage2
    from glag.sampling import FactorBank, sample_calibrated
    path, out, backend = sys.argv[1:4]
    import faiss  # warm up what stage two imports lazily (faiss, the sampler)
    b = FactorBank.from_factors([torch.randn(8, 4), torch.randn(8, 4)])
    sample_calibrated(b, torch.zeros(2, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                      torch.full((2,), 3), torch.zeros(2, dtype=torch.long), backend=backend)
    reset = reset_peak_rss()
    base = rss_bytes()
    budget = base + (40 << 20)
    m = train_stage2(Stage2Config(features=path, out=out, epochs=1, n_max=500, backend=backend,
                                  max_memory=budget, progress=False, omega_init=0.6))
    print(json.dumps({"reset": reset, "base": base, "peak": peak_rss_bytes(), "budget": budget,
                      "path": m["data_path"], "fits": m["stream_plan"]["fits"], "top1": m["stage2"]["test"]["top1"]}))
""")


def test_peak_memory_stays_bounded_in_a_subprocess(tmp_path):
    """64 MiB of train features (in memory: ~400 MiB with the Tukey copy, the sorted copy and one
    epoch) trained under a budget of the process + 40 MiB: the streaming path; the peak RSS stays
    within the budget, so it grows by less than the file's features."""
    counts = [16_000] * 4 + [60, 50, 40, 30, 25, 20, 15, 12, 10, 8, 6, 4]
    path = write_synthetic_features(tmp_path / "big.h5", counts, 256, val_per_class=5, test_per_class=5,
                                    seed=2, chunk_rows=8192)
    features = sum(counts) * 256 * 4
    # the torch sampler: the numba one's per-call start-up dominates at this size on a busy machine
    res = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(tmp_path / "run"), "torch"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if not r["reset"]:
        pytest.skip("cannot reset VmHWM (/proc/self/clear_refs) here: the peak would include the warm-up")
    assert r["path"] == "streaming" and r["fits"]
    growth = r["peak"] - r["base"]
    assert r["peak"] <= r["budget"], (r, growth / 2**20)
    assert growth < 0.75 * features, (growth / 2**20, features / 2**20)
    assert r["top1"] > 50.0


def test_streamed_run_resumed_under_another_budget_keeps_its_plan(feats, tmp_path):
    """A streamed run resumed with another --max-memory (even none) goes on with the data path
    and block plan it was trained with, so it ends as the uninterrupted run; another
    --stream-block-rows is refused. A run trained in memory stays in memory under a tiny budget."""
    import dataclasses

    from glag.errors import UsageError

    full = train_stage2(cfg(feats, tmp_path / "full", epochs=4, omega_init=0.6, max_memory=TINY, stream_block_rows=64))
    c = cfg(feats, tmp_path / "part", epochs=4, omega_init=0.6, max_memory=TINY, stream_block_rows=64)
    _run_epochs(c, 2, StreamingEpochBuilder, "plan_epoch")
    with pytest.raises(UsageError, match="--stream-block-rows: 64 in the run, 32 now"):
        train_stage2(dataclasses.replace(c, stream_block_rows=32), resume=True)
    resumed = train_stage2(dataclasses.replace(c, max_memory=None), resume=True)
    assert resumed["data_path"] == "streaming" and resumed["stage2"] == full["stage2"]

    mem_full = train_stage2(cfg(feats, tmp_path / "mem_full", epochs=3, omega_init=0.6))
    m = cfg(feats, tmp_path / "mem", epochs=3, omega_init=0.6)
    _run_epochs(m, 1)
    resumed = train_stage2(dataclasses.replace(m, max_memory=TINY), resume=True)
    assert resumed["data_path"] == "memory" and resumed["stage2"] == mem_full["stage2"]


def test_plan_sizes_do_not_follow_small_differences_of_the_process_memory(tmp_path):
    """The block sizes (and with them an epoch's sample order) are cut from a grid of budget / 32,
    so start-up memory differing by a few MiB between two runs of one command gives the same
    plan: over 20 baselines 1 MiB apart (about 3 grid steps) at most 4 plans, each for a run of
    consecutive baselines; the exact bytes left would give a plan for every MiB."""
    from glag.streaming import PLAN_STEPS, plan_streaming

    path = write_synthetic_features(tmp_path / "s.h5", [3000] * 20 + [40] * 80, 128, val_per_class=5,
                                    test_per_class=5, seed=1)
    budget = 100 << 20
    c = Stage2Config(features=str(path), max_memory=str(budget)).resolved()
    with open_features(path) as ff:
        plans = [plan_streaming(ff, c, budget, baseline=(40 + i) << 20) for i in range(20)]
    assert all(p.fits for p in plans)
    sizes = [(p.block_rows, p.granule_rows, p.piece_samples, p.pass_rows, p.eval_rows, p.tail_dtype) for p in plans]
    changes = sum(a != b for a, b in zip(sizes, sizes[1:]))
    assert changes <= 20 * (1 << 20) // (budget // PLAN_STEPS) + 1, sizes
    assert len(set(sizes)) == changes + 1  # a plan never comes back: one run of baselines each
