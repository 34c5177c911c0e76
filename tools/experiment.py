"""Repeat the pipeline over seeds and stage-one losses; report mean ± std of test accuracy.

    python tools/experiment.py --out runs/table --seeds 0 1 2 --losses ce la graloss \
        --methods crt dc afg glag

Each (loss, seed) is one tools/pipeline.py run in <out>/<loss>-s<seed> (finished stages are
reused, so an interrupted experiment resumes). The table (top-1 and Many/Medium/Few, test split,
mean ± std over seeds, sample std) goes to <out>/table.md and <out>/table.json and is printed.
Model selection and ω always use the validation split; the test split is read once per run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools import pipeline
    from tools._common import cli_main
else:
    from . import pipeline
    from ._common import cli_main

COLUMNS = ("top1", "many", "medium", "few")


def aggregate(out: Path, losses, seeds, methods, split: str = "test") -> dict:
    """{row name: {column: (mean, std, n)}} from the finished runs under ``out``; std (ddof 1) is
    None for a single run."""
    rows: dict[str, list[dict]] = {}
    for loss in losses:
        for seed in seeds:
            base = out / f"{loss}-s{seed}"
            m1 = json.loads((base / "stage1" / "metrics.json").read_text())
            rows.setdefault(f"{loss} (stage one)", []).append(m1[split])
            for method in methods:
                m2 = json.loads((base / method / "metrics.json").read_text())
                rows.setdefault(f"{loss} → {method}", []).append(m2["stage2"][split])
    table = {}
    for name, runs in rows.items():
        table[name] = {}
        for c in COLUMNS:
            v = np.array([r[c] for r in runs], dtype=float)
            table[name][c] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None, len(v))
    return table


def to_markdown(table: dict, title: str) -> str:
    lines = [title, "", "| method | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, cols in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.2f} ± {'n/a' if s is None else f'{s:.2f}'}"
                                                 for m, s, _ in cols.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="glag-experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/table", help="(default: %(default)s)")
    p.add_argument("--dataset", default="fmnist-lt", help="(default: %(default)s)")
    p.add_argument("--data-root", help="where the dataset is")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: 0 1 2)")
    p.add_argument("--losses", nargs="+", default=["ce", "la", "graloss"], choices=("ce", "la", "bs", "graloss"),
                   help="stage-one losses (default: ce la graloss; la uses τ = 1)")
    p.add_argument("--methods", nargs="+", default=["crt", "dc", "afg", "glag"],
                   choices=("crt", "dc", "afg", "glag"), help="stage-two methods (default: all four)")
    p.add_argument("--stage1-args", default="", help="extra options for every stage-one run, quoted")
    p.add_argument("--stage2-args", default="", help="extra options for every stage-two run, quoted")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    for name in ("seeds", "losses", "methods"):
        values = getattr(args, name)
        if len(set(values)) != len(values):
            from glag.errors import UsageError

            raise UsageError(f"--{name} {' '.join(map(str, values))}: a {name[:-1]} may appear once (each run "
                             f"counts once in the mean and the spread)")
    out = Path(args.out)
    for loss in args.losses:
        for seed in args.seeds:
            argv = ["--out", str(out / f"{loss}-s{seed}"), "--dataset", args.dataset, "--seed", str(seed),
                    "--loss", loss, "--stage2-methods", *args.methods, "--stage1-args", args.stage1_args,
                    "--stage2-args", args.stage2_args]
            argv += ["--data-root", args.data_root] if args.data_root else []
            argv += [] if args.progress else ["--no-progress"]
            pipeline.main(argv)
    table = aggregate(out, args.losses, args.seeds, args.methods)
    md = to_markdown(table, f"{args.dataset}, test accuracy (%), mean ± std over seeds {args.seeds}")
    (out / "table.md").write_text(md)
    from glag.runs import atomic_write_json

    atomic_write_json(out / "table.json", table)  # (NaN, e.g. an empty group, as null)
    print(md)
    return 0


def cli(argv=None) -> int:
    """The ``glag-experiment`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, "run the same command again: finished runs are skipped, stopped ones resume")


if __name__ == "__main__":
    sys.exit(cli())
