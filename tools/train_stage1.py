"""Stage one: train a backbone on long-tailed data with GraLoss (or CE / LA / Balanced Softmax).

    python tools/train_stage1.py --dataset fmnist-lt --loss graloss --out runs/fmnist-graloss
    python tools/train_stage1.py --out runs/fmnist-graloss --resume        # continue after a crash
    torchrun --nproc_per_node 2 tools/train_stage1.py --out runs/ddp        # DDP: 2 processes (or GPUs)

Under torchrun (gloo on CPU, nccl on GPU) --batch-size is the global batch, split evenly over the
processes (it must be a multiple of their number); only rank 0 logs, shows progress and writes;
--resume works the same way.

Writes into --out: config.json, env.json (commit, versions, seed), indices.npz (the chosen images),
summary.csv (one row per epoch), last.pt, best.pt (chosen on the validation split) and metrics.json
(top-1 and Many/Medium/Few on val and test).
"""
from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):  # run as a script: make "tools" importable as a package
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools._common import (add_data_args, cli_main, config_from_args, parse_args_with_config, resume_hint,
                               setup_logging)
else:
    from ._common import (add_data_args, cli_main, config_from_args, parse_args_with_config, resume_hint,
                          setup_logging)


def build_parser() -> argparse.ArgumentParser:
    from glag.losses import SCHEDULES, StageOneLoss
    from glag.models import ARCHS

    p = argparse.ArgumentParser(prog="glag-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/stage1", help="run folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--config", help="a JSON file (e.g. an earlier run's config.json) whose values become the "
                                    "defaults; flags given here still win")
    add_data_args(p)
    g = p.add_argument_group("model and loss")
    g.add_argument("--arch", choices=ARCHS, help="backbone (default: resnet32; resnet10 for --dataset list and folder)")
    g.add_argument("--loss", default="graloss", choices=StageOneLoss.METHODS,
                   help="ce: cross entropy; la: logit adjustment with fixed --tau; bs: Balanced Softmax (τ=1); "
                        "graloss: τ(t) = α(t/T)^β grows from 0 to α (default: %(default)s)")
    g.add_argument("--tau", type=float, default=1.0, help="the fixed τ of --loss la (default: %(default)s)")
    g.add_argument("--schedule", default="power", choices=SCHEDULES,
                   help="shape of GraLoss's τ(t): power uses --tau-beta; linear/convex/concave/step/constant "
                        "(default: %(default)s)")
    g.add_argument("--tau-alpha", type=float, default=1.0, help="α of τ(t) = α(t/T)^β (default: %(default)s)")
    g.add_argument("--tau-beta", type=float, default=2.0,
                   help="β of τ(t); > 1 convex, as the paper found best (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="(default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine decay (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="(default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="(default: %(default)s)")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear LR warm-up (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the LT subset, data order and initialisation (default: %(default)s)")
    g = p.add_argument_group("machine")
    g.add_argument("--num-workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    g.add_argument("--eval-batch-size", type=int, default=512, help="(default: %(default)s)")
    g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW memory layout (channels-last is faster on CPU)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv=None) -> int:
    args = parse_args_with_config(build_parser(), argv, kind="stage1")
    from glag import distributed

    distributed.init_from_env()  # no-op without torchrun
    main_process = distributed.is_main()
    setup_logging(args.verbose, main_process=main_process)
    try:
        from glag.stage1 import Stage1Config, train_stage1

        cfg = config_from_args(Stage1Config, args)
        metrics = train_stage1(cfg, resume=args.resume)
    finally:
        distributed.cleanup()
    if main_process:
        from glag.metrics import format_table

        print(f"stage one ({cfg.loss}), best epoch {metrics['best_epoch']} chosen on val; run folder {cfg.out}")
        print(format_table({"val": metrics["val"], "test": metrics["test"]}))
    return 0


def cli(argv=None) -> int:
    """The ``glag-train`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, resume_hint(build_parser))


if __name__ == "__main__":
    sys.exit(cli())
