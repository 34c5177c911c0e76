"""Stage-two benchmarks on synthetic feature files (DESIGN.md, "Performance targets" and "Scale").

    python tools/bench_stage2.py --profile cifar100                   # 40 epochs in memory; target < 30 s
    python tools/bench_stage2.py --profile inat --max-memory 4G       # one epoch, streamed from disk
    python tools/bench_stage2.py --profile inat --max-steps 200       # a partial epoch, extrapolated

Profiles:

* ``cifar100``: CIFAR-100-LT's shape: 100 classes, ``lt_profile(100, 500, 100)`` (10,847 train
  rows), d = 64, 20 val and 100 test rows a class. Runs GLAG stage two for 40 epochs in memory.
* ``inat``: iNaturalist 2018's shape: 437,513 train rows of d = 2,048 in 8,142 classes, 3 val and
  3 test rows a class (iNat 2018's own val split has 3 a class). Class counts: a long-tailed
  profile with the real one's shape and sizes: max 1,000, min 2, sum exactly 437,513, and the
  real Many / Medium / Few split (842 classes with > 100 images, 4,076 with 20-100, 3,224 with
  < 20). It is log-linear in rank within the Medium and Few ranges and concave (in log count)
  within Many, the curvature solved so that the total is exact (:func:`inat2018_profile`). The
  file is ~4 GB of float32 features (half with ``--dtype float16``) plus ~16 GB of N x C teacher
  logits (``--no-logits`` skips them and KD). Runs ONE epoch under ``--max-memory`` (default 4G).

The file is written once (free disk is checked first) and reused while its shape matches. The
training run happens in a child process, so that its peak RSS (``VmHWM``) is the training's
alone, not the writer's; the result (wall time, per-epoch times, peak RSS vs budget, data path
and memory plan, accuracies) is printed and written as JSON. With ``--max-steps`` each epoch
stops after that many SGD steps and the full epoch's time is extrapolated from the measured
steps (an iNaturalist GLAG epoch is 8.1 M samples, 31,805 steps of 256: hours on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools._common import cli_main, setup_logging
else:
    from ._common import cli_main, setup_logging

import numpy as np

INAT_CLASSES, INAT_IMAGES, INAT_DIM = 8142, 437_513, 2048
INAT_SPLIT = (842, 4076, 3224)  # Many (> 100), Medium (20-100), Few (< 20) classes of iNat 2018


def inat2018_profile() -> np.ndarray:
    """(8142,) int64 class counts with iNaturalist 2018's size and shape (module docstring).

    Three segments in rank order, each interpolating log(count): Many from 1,000 down to 101 as
    ``t**gamma`` (t in [0, 1]), Medium from 100 to 20 and Few from 19 to 2 linearly; gamma is
    found by bisection so that the rounded counts sum to exactly 437,513.
    """
    def counts(gamma: float) -> np.ndarray:
        parts = []
        for n, hi, lo, g in ((INAT_SPLIT[0], 1000, 101, gamma), (INAT_SPLIT[1], 100, 20, 1.0),
                             (INAT_SPLIT[2], 19, 2, 1.0)):
            t = np.linspace(0.0, 1.0, n)
            parts.append(np.exp(np.log(hi) + (np.log(lo) - np.log(hi)) * t ** g))
        return np.round(np.concatenate(parts)).astype(np.int64)

    lo, hi = 0.05, 1.0  # the sum falls as gamma falls (the head drops faster)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if counts(mid).sum() > INAT_IMAGES:
            hi = mid
        else:
            lo = mid
    c = counts(lo)
    # the bisection lands on the exact total; should rounding leave a few images over or under,
    # move them onto head classes that stay strictly above their successor (order kept)
    diff = INAT_IMAGES - int(c.sum())
    i = 1
    while diff and i < INAT_SPLIT[0] - 1:
        step = 1 if diff > 0 else -1
        if c[i - 1] > c[i] + step and c[i] + step > c[i + 1]:
            c[i] += step
            diff -= step
        i += 1
    assert c.sum() == INAT_IMAGES and c.max() == 1000 and c.min() == 2 and np.all(np.diff(c) <= 0)
    assert ((c > 100).sum(), ((c >= 20) & (c <= 100)).sum(), (c < 20).sum()) == INAT_SPLIT
    return c


def profile_spec(name: str) -> dict:
    from glag.synthetic import synthetic_counts

    if name == "cifar100":
        return dict(counts=synthetic_counts(100, 500, 100), dim=64, val=20, test=100, epochs=40, max_memory=None)
    return dict(counts=inat2018_profile(), dim=INAT_DIM, val=3, test=3, epochs=1, max_memory="4G")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glag-bench-stage2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=("cifar100", "inat"), default="cifar100",
                   help="the shape of the synthetic feature file (default: %(default)s)")
    p.add_argument("--path", help="feature file to write or reuse (default: bench_<profile>.h5 in the current folder)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="on-disk feature dtype; float16 halves the features (default: %(default)s)")
    p.add_argument("--no-logits", dest="logits", action="store_false",
                   help="write no teacher logits (saves 16 GB for inat; KD is then off)")
    p.add_argument("--overwrite", action="store_true", help="rewrite the file even if it matches")
    p.add_argument("--max-memory", help="stage two's --max-memory budget, e.g. 4G (default: none for cifar100, "
                                        "4G for inat)")
    p.add_argument("--epochs", type=int, help="epochs to run (default: 40 for cifar100, 1 for inat)")
    p.add_argument("--max-steps", type=int, help="stop each epoch after this many steps and extrapolate")
    p.add_argument("--method", default="glag", help="stage-two method (default: %(default)s)")
    p.add_argument("--omega-init", type=float, default=0.6,
                   help="ω_init of the one timed run; the stage-two default, 'auto', makes one such run per "
                        "grid value (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: stage two's own choice)")
    p.add_argument("--backend", choices=("cuda", "numba", "torch"), help="sampler backend (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", help="run folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--json", help="write the result here (default: bench_stage2_<profile>.json)")
    p.add_argument("--child-result", help=argparse.SUPPRESS)  # internal: run the measurement, write here
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def ensure_file(args, spec) -> dict:
    """Write the synthetic file unless a matching one is there; returns what was done and how long it took."""
    from glag.features import FeatureFileError, open_features
    from glag.synthetic import write_synthetic_features

    path = Path(args.path)
    counts = spec["counts"]
    C, d = len(counts), spec["dim"]
    if path.exists() and not args.overwrite:
        try:
            with open_features(path) as ff:
                import h5py

                with h5py.File(path, "r", locking=False) as f:
                    dtype = str(f["train/features"].dtype)
                ok = (ff.num_classes == C and ff.feature_dim == d and np.array_equal(ff.class_counts, counts)
                      and dtype == args.dtype and ff.has_logits("train") == args.logits)
        except FeatureFileError:
            ok = False
        if ok:
            print(f"reusing {path} ({path.stat().st_size / 2**30:.2f} GiB)")
            return {"written": False, "write_seconds": None, "file_bytes": path.stat().st_size}
        print(f"{path} exists but does not match the {args.profile} profile: rewriting it")
    rows = int(counts.sum()) + C * (spec["val"] + spec["test"])
    need = rows * (d * np.dtype(args.dtype).itemsize + 16 + (C * 4 if args.logits else 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if need * 1.05 + (1 << 30) > free:
        sys.exit(f"error: the {args.profile} file needs ~{need / 2**30:.1f} GiB but {path.parent.resolve()} has "
                 f"{free / 2**30:.1f} GiB free. Pass --path on a larger disk, --dtype float16"
                 f"{' or --no-logits' if args.logits else ''}.")
    print(f"writing {path}: {int(counts.sum()):,} x {d} train rows, {C:,} classes, {args.dtype}, "
          f"{'with' if args.logits else 'without'} logits, ~{need / 2**30:.2f} GiB")
    from tqdm.auto import tqdm

    t0 = time.time()
    with tqdm(total=rows, unit="row", unit_scale=True, desc="write") as bar:
        # ~64 MiB of features + logits a chunk keeps the writer's memory small
        chunk = max(256, (64 << 20) // (4 * (d + (C if args.logits else 0))))
        write_synthetic_features(path, counts, d, val_per_class=spec["val"], test_per_class=spec["test"],
                                 seed=args.seed, dtype=args.dtype, with_logits=args.logits, chunk_rows=chunk,
                                 overwrite=True, progress=bar.update)
    return {"written": True, "write_seconds": time.time() - t0, "file_bytes": path.stat().st_size}


def stage2_config(args, **extra):
    """The stage-two config this benchmark runs, from its options (``extra``: out, progress)."""
    from glag.stage2 import Stage2Config

    return Stage2Config(features=str(args.path), method=args.method, omega_init=args.omega_init, epochs=args.epochs,
                        batch_size=args.batch_size, seed=args.seed, backend=args.backend, threads=args.threads,
                        max_memory=args.max_memory, max_steps_per_epoch=args.max_steps, **extra)


def measure(args, spec) -> dict:
    """The child: run stage two once and report times, peak RSS and the data path."""
    import torch

    from glag.stage2 import train_stage2
    from glag.streaming import parse_bytes, peak_rss_bytes, rss_bytes

    start_rss = rss_bytes()
    out = args.out or tempfile.mkdtemp(prefix="bench_stage2_")
    cfg = stage2_config(args, out=os.path.join(out, "run"), progress=True)
    t0 = time.time()
    try:
        metrics = train_stage2(cfg)
        wall = time.time() - t0
        import csv

        with open(os.path.join(cfg.out, "summary.csv")) as fh:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    C = len(spec["counts"])
    n_max = int(spec["counts"].max())
    steps_per_epoch = math.ceil(C * n_max / args.batch_size)
    epochs = []
    for r in rows:
        train_s = r["seconds"] - r["val_seconds"]
        full = train_s * steps_per_epoch / max(1, r["steps"]) + r["val_seconds"]
        epochs.append({"epoch": int(r["epoch"]), "seconds": r["seconds"], "steps": int(r["steps"]),
                       "data_seconds": r["gen_seconds"], "val_seconds": r["val_seconds"],
                       "seconds_per_step": train_s / max(1, r["steps"]),
                       "full_epoch_seconds_estimate": full, "samples": int(r["samples"])})
    return {"wall_seconds": wall, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
            "peak_rss_bytes": peak_rss_bytes(), "start_rss_bytes": start_rss,
            "budget_bytes": parse_bytes(args.max_memory) if args.max_memory else None,
            # what train_stage2 used: cfg.threads, else 1 for small heads (d·C <= 2^20), else torch's default
            "torch_threads": args.threads or (1 if C * spec["dim"] <= 2 ** 20 else torch.get_num_threads()),
            "data_path": metrics.get("data_path"), "stream_plan": metrics.get("stream_plan"),
            "setup_seconds": metrics.get("setup_seconds"),
            "test_top1": metrics["stage2"].get("test", {}).get("top1"),
            "stage1_test_top1": metrics["stage1"].get("test", {}).get("top1")}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    spec = profile_spec(args.profile)
    args.path = args.path or f"bench_{args.profile}.h5"
    if args.epochs is None:  # (--epochs 0 is refused below, not replaced)
        args.epochs = spec["epochs"]
    if args.max_memory is None:
        args.max_memory = spec["max_memory"]
    if not args.child_result:  # the run's options checked here, before a file is written or a child started
        from glag.errors import UsageError

        stage2_config(args).resolved()
        if os.path.isdir(args.path):
            raise UsageError(f"--path {args.path} is a folder; give the feature file to write or reuse")
        if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a file; give a folder for the run")
    if args.child_result:
        Path(args.child_result).write_text(json.dumps(measure(args, spec)))
        return 0

    file_info = ensure_file(args, spec)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = fh.name
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--path", str(args.path), "--child-result", result_path]
    steps = f", {args.max_steps} steps each" if args.max_steps else ""
    print(f"stage two ({args.method}, {args.epochs} epoch(s){steps}, --max-memory {args.max_memory}) "
          f"in a child process ...")
    t0 = time.time()
    rc = subprocess.run(cmd).returncode
    child_wall = time.time() - t0
    import resource

    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    if rc != 0:
        print(f"error: the stage-two run failed (exit {rc})", file=sys.stderr)
        return rc
    res = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    C, d = len(spec["counts"]), spec["dim"]
    res.update({"profile": args.profile, "file": str(args.path), "dtype": args.dtype, "logits": args.logits,
                "train_rows": int(spec["counts"].sum()), "num_classes": C, "feature_dim": d,
                "train_feature_bytes": int(spec["counts"].sum()) * d * 4, "method": args.method,
                "max_steps": args.max_steps, "child_wall_seconds": child_wall,
                "child_peak_rss_bytes_getrusage": child_peak, **file_info})
    gib = 2 ** 30
    print(f"\n== stage two, {args.profile} profile: {res['train_rows']:,} x {d}, {C:,} classes ==")
    print(f"file: {args.path}, {res['file_bytes'] / gib:.2f} GiB on disk"
          + (f", written in {res['write_seconds']:.0f} s" if res["written"] else " (reused)"))
    setup = res.get("setup_seconds")
    print(f"data path: {res['data_path']}"
          + (f", set-up (statistics pass + support search) {setup:.1f} s" if setup is not None else ""))
    for e in res["epochs"]:
        line = f"epoch {e['epoch']}: {e['seconds']:.2f} s, {e['steps']} steps"
        if args.max_steps:
            full = e["full_epoch_seconds_estimate"]
            line += (f" of {res['steps_per_epoch']} ({e['seconds_per_step']:.3f} s a step, data "
                     f"{e['data_seconds']:.1f} s, val {e['val_seconds']:.1f} s): full epoch ~{full:.0f} s"
                     f" = {full / 3600:.2f} h")
        print(line)
    total = sum(e["seconds"] for e in res["epochs"])
    print(f"stage two wall time: {res['wall_seconds']:.1f} s ({total:.1f} s in {len(res['epochs'])} epochs)")
    budget = res["budget_bytes"]
    peak = res["peak_rss_bytes"]
    print(f"peak RSS: {peak / gib:.2f} GiB (process at start {res['start_rss_bytes'] / gib:.2f} GiB)"
          + (f"; budget {budget / gib:.2f} GiB: {'UNDER' if peak <= budget else 'OVER'}" if budget else ""))
    print(f"test top-1: stage two {res['test_top1']:.2f}, stage one (teacher) "
          f"{res['stage1_test_top1'] if res['stage1_test_top1'] is None else round(res['stage1_test_top1'], 2)}")
    out = args.json or f"bench_stage2_{args.profile}.json"
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def cli(argv=None) -> int:
    """The ``glag-bench-stage2`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, "run it again: a feature file that matches is reused")


if __name__ == "__main__":
    sys.exit(cli())
