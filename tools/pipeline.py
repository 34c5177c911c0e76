"""The whole GLAG pipeline on one dataset: stage one -> features -> AFG stage two, one command.

    python tools/pipeline.py                              # fmnist-lt, GraLoss + GLAG, into runs/pipeline
    python tools/pipeline.py --out runs/p1 --seed 1 --stage2-methods crt dc afg glag

It runs tools/train_stage1.py, tools/extract.py and tools/afg_train.py with their defaults
(override any stage's options with --stage1-args / --stage2-args), in the folders
<out>/stage1, <out>/feats.h5 and <out>/<method>, and prints one table: stage one and each
stage-two method, top-1 and Many/Medium/Few on val and test. Every stage's options are checked
before anything runs. A stage whose output is already complete is not run again, so an
interrupted pipeline resumes; if its options have changed since, the pipeline stops and names
them (delete the stage's folder, or choose another --out, to redo it). --stage1-args and
--stage2-args may not set what the pipeline sets itself (--out, --seed, --loss, the data, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools import afg_train, extract, train_stage1
    from tools._common import cli_main, config_from_args, parse_args_with_config, setup_logging
else:
    from . import afg_train, extract, train_stage1
    from ._common import cli_main, config_from_args, parse_args_with_config, setup_logging

# flags the pipeline passes itself: --stage1-args / --stage2-args may not set them
_MANAGED = {"stage1": ("--out", "--resume", "--seed", "--loss", "--dataset", "--data-root", "--config"),
            "stage2": ("--out", "--resume", "--seed", "--method", "--features", "--config")}


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


def _extra_args(args, stage: str) -> list[str]:
    """``--stage1-args`` / ``--stage2-args`` as a list; a flag the pipeline sets itself is refused."""
    from glag.errors import UsageError

    text = getattr(args, f"{stage}_args")
    try:
        extra = shlex.split(text)
    except ValueError as exc:  # an unbalanced quote
        raise UsageError(f"--{stage}-args {text!r}: {exc}") from None
    taken = [a for a in extra if a.split("=", 1)[0] in _MANAGED[stage]]
    if taken:
        raise UsageError(f"--{stage}-args may not set {', '.join(taken)}: the pipeline sets "
                         f"{', '.join(_MANAGED[stage])} itself; use its own options (--out, --seed, --loss, "
                         f"--dataset, --data-root, --stage2-methods)")
    return extra


def _config(tool, cls, argv: list[str], resolve: bool = False) -> dict:
    """The options ``tool`` would run with for ``argv`` (checked: an out-of-range value is refused
    here, before any stage runs), as its config.json would hold them."""
    cfg = config_from_args(cls, parse_args_with_config(tool.build_parser(), argv))
    return dataclasses.asdict(cfg.resolved() if resolve else cfg)


def _finished(run: Path, options: dict, free) -> bool:
    """Whether ``run`` is complete; if so, it must have been made with ``options`` (apart from
    ``free`` ones): another value of any other option is refused, naming it."""
    from glag.runs import check_resume_options

    if not (run / "metrics.json").exists():
        return False
    check_resume_options(json.loads((run / "config.json").read_text()), options, run, free, warn=(),
                         fix=f"Run the pipeline with the options it was run with, or delete {run} (or choose "
                             f"another --out) to redo that stage")
    return True


def _check_features_follow(feats: Path, checkpoint: Path, stage2_runs: list[Path]) -> None:
    """A kept ``feats.h5`` must come from the stage-one checkpoint there now: after stage one is
    redone (its folder deleted), the old features and the stage-two runs made from them would
    otherwise be reported as the new model's."""
    from glag.errors import UsageError
    from glag.features import open_features, sha256_file

    with open_features(feats) as ff:
        extracted_from = ff.attrs.get("checkpoint_sha256")
    now = sha256_file(checkpoint)
    if extracted_from != now:
        runs = " ".join(str(r) for r in stage2_runs if r.exists())
        raise UsageError(f"{feats} was extracted from another stage-one checkpoint (sha256 {extracted_from}) than "
                         f"{checkpoint} (sha256 {now}), so its features and the stage-two runs made from them are "
                         f"the old model's. Delete {feats}{' and ' + runs if runs else ''} to redo them from this "
                         f"checkpoint, or choose another --out")


def _check_stage2_features(run: Path, feats: Path, now: str) -> None:
    """A finished or started stage-two run must have been trained on ``feats`` as it is now
    (``now``: its fingerprint)."""
    from glag.errors import UsageError

    if not (run / "config.json").exists():
        return
    made_on = json.loads((run / "config.json").read_text()).get("features_fingerprint")
    if made_on not in (None, now):
        raise UsageError(f"{run} was trained on other features (fingerprint {made_on}) than {feats} now "
                         f"(fingerprint {now}), which was extracted again since. Delete {run} to redo it, "
                         f"or choose another --out")


def main(argv=None) -> int:
    from glag import stage1, stage2

    args = build_parser().parse_args(argv)
    setup_logging()
    out = Path(args.out)
    quiet = [] if args.progress else ["--no-progress"]
    data = ["--dataset", args.dataset] + (["--data-root", args.data_root] if args.data_root else [])
    s1, feats = out / "stage1", out / "feats.h5"
    s1_argv = ["--out", str(s1), "--loss", args.loss, "--seed", str(args.seed), *data, *quiet,
               *_extra_args(args, "stage1")]
    s2_extra = _extra_args(args, "stage2")
    s2_argv = {m: ["--features", str(feats), "--out", str(out / m), "--method", m, "--seed", str(args.seed), *quiet,
                   *s2_extra] for m in args.stage2_methods}
    s1_options = _config(train_stage1, stage1.Stage1Config, s1_argv)
    s2_options = {m: _config(afg_train, stage2.Stage2Config, a, resolve=True) for m, a in s2_argv.items()}
    t0 = time.time()
    if not _finished(s1, s1_options, stage1.RESUME_FREE_OPTIONS):
        train_stage1.main(s1_argv + (["--resume"] if (s1 / "config.json").exists() else []))
    t1 = time.time()
    if feats.exists():
        _check_features_follow(feats, s1 / "best.pt", [out / m for m in args.stage2_methods])
    else:
        extract.main(["--checkpoint", str(s1 / "best.pt"), "--out", str(feats), *quiet]
                     + (["--data-root", args.data_root] if args.data_root else []))
    t2 = time.time()
    from glag.metrics import format_table

    from glag.features import open_features

    with open_features(feats) as ff:
        fingerprint = ff.fingerprint()  # once: the file does not change while the methods run
    rows = {}
    for method in args.stage2_methods:
        run = out / method
        _check_stage2_features(run, feats, fingerprint)
        if not _finished(run, s2_options[method], stage2.RESUME_FREE_OPTIONS):
            afg_train.main(s2_argv[method] + (["--resume"] if (run / "config.json").exists() else []))
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
