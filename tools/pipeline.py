"""The whole GLAG pipeline on one dataset: stage one -> features -> AFG stage two, one command.

    python tools/pipeline.py                              # fmnist-lt, GraLoss + GLAG, into runs/pipeline
    python tools/pipeline.py --out runs/p1 --seed 1 --stage2-methods crt dc afg glag

It runs tools/train_stage1.py, tools/extract.py and tools/afg_train.py with their defaults
(override any stage's options with --stage1-args / --stage2-args), in the folders
<out>/stage1, <out>/feats.h5 and <out>/<method>, and prints one table: stage one and each
stage-two method, top-1 and Many/Medium/Few on val and test. A stage whose output is already
complete is not run again (delete it to redo it), so an interrupted pipeline resumes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools import afg_train, extract, train_stage1
    from tools._common import cli_main, setup_logging
else:
    from . import afg_train, extract, train_stage1
    from ._common import cli_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glag-pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pipeline", help="root folder of the three stages (default: %(default)s)")
    p.add_argument("--dataset", default="fmnist-lt", help="(default: %(default)s)")
    p.add_argument("--data-root", help="where the dataset is (default: the dataset's usual place)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--loss", default="graloss", help="stage-one loss (default: %(default)s)")
    p.add_argument("--stage2-methods", nargs="+", default=["glag"], choices=("crt", "dc", "afg", "glag"),
                   help="stage-two methods to run on the same features (default: glag)")
    p.add_argument("--stage1-args", default="", help="extra options for train_stage1.py, quoted")
    p.add_argument("--stage2-args", default="", help="extra options for afg_train.py, quoted")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    out = Path(args.out)
    quiet = [] if args.progress else ["--no-progress"]
    data = ["--dataset", args.dataset] + (["--data-root", args.data_root] if args.data_root else [])
    t0 = time.time()
    s1 = out / "stage1"
    if not (s1 / "metrics.json").exists():
        resume = ["--resume"] if (s1 / "config.json").exists() else []
        train_stage1.main(["--out", str(s1), "--loss", args.loss, "--seed", str(args.seed), *data, *resume,
                           *quiet, *shlex.split(args.stage1_args)])
    t1 = time.time()
    feats = out / "feats.h5"
    if not feats.exists():
        extract.main(["--checkpoint", str(s1 / "best.pt"), "--out", str(feats), *quiet]
                     + (["--data-root", args.data_root] if args.data_root else []))
    t2 = time.time()
    from glag.metrics import format_table

    rows = {}
    for method in args.stage2_methods:
        run = out / method
        if not (run / "metrics.json").exists():
            resume = ["--resume"] if (run / "config.json").exists() else []
            afg_train.main(["--features", str(feats), "--out", str(run), "--method", method, "--seed",
                            str(args.seed), *resume, *quiet, *shlex.split(args.stage2_args)])
        m = json.loads((run / "metrics.json").read_text())
        if not rows:
            rows.update({f"stage one ({args.loss}), {k}": v for k, v in m["stage1"].items()})
        rows.update({f"{method}, {k}": v for k, v in m["stage2"].items()})
    t3 = time.time()
    print(f"\nGLAG pipeline on {args.dataset}, seed {args.seed} (selection on val; test used once), "
          f"top-1 and Many/Medium/Few accuracy (%):")
    print(format_table(rows))
    print(f"time: stage one {t1 - t0:.0f}s, extraction {t2 - t1:.0f}s, stage two {t3 - t2:.0f}s; "
          f"results in {out}/")
    return 0


def cli(argv=None) -> int:
    """The ``glag-pipeline`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, "run the same command again: finished steps are skipped, stopped ones resume")


if __name__ == "__main__":
    sys.exit(cli())
