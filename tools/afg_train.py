"""AFG + classifier-only stage two on cached features (GLAG by default; cRT, DC, AFG for comparison).

    python tools/afg_train.py --features feats.h5 --out runs/fmnist-glag
    python tools/afg_train.py --features feats.h5 --method crt --out runs/fmnist-crt

Reads the feature file of tools/extract.py (or any HDF5 file in its schema), fits class
statistics in Tukey space, finds each tail sample's k nearest head-class means with FAISS,
tops every class up to n_max with calibrated Gaussian samples each epoch, and trains a linear
classifier with CE + τ(t)·KD (KD from the stage-one logits on head-class samples). ω per tail
class moves with its validation accuracy; its initial value is chosen on validation from a small
grid (--omega-init auto, one run per value under <out>/omega_init/). With --max-memory, features that do not fit are
streamed from the file (e.g. iNaturalist at d = 2048: --max-memory 4G). Writes into --out: config.json, env.json,
summary.csv, omega.json, best.pt, last.pt, metrics.json, per_class_test.png, omega.png, and with
--omega-init auto omega_init.png and one run folder per candidate in omega_init/.
"""
from __future__ import annotations

import argparse
import json
import sys

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools._common import cli_main, config_from_args, parse_args_with_config, resume_hint, setup_logging
else:
    from ._common import cli_main, config_from_args, parse_args_with_config, resume_hint, setup_logging


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _omega_init(s: str):
    if s == "auto":
        return s
    try:
        w = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'auto', got {s!r}") from None
    if not 0.0 <= w <= 1.0:
        raise argparse.ArgumentTypeError(f"ω must lie in [0, 1], got {w}")
    return w


def _bytes(s: str) -> int:
    from glag.streaming import parse_bytes

    try:
        return parse_bytes(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from glag.afg import WEIGHT_MODES, AdaptiveOmega
    from glag.sampling import MODES
    from glag.stage2 import METHODS

    p = argparse.ArgumentParser(prog="glag-afg-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="the HDF5 feature file (tools/extract.py)")
    p.add_argument("--out", default="runs/stage2", help="run folder (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--config", help="a JSON file (e.g. an earlier run's config.json) whose values become the "
                                    "defaults; flags given here still win")
    p.add_argument("--method", default="glag", choices=list(METHODS),
                   help="crt: class-balanced re-training on real features; dc: Free-Lunch Distribution "
                        "Calibration (uniform weights, ω = k/(k+1), no KD); afg: adaptive generator without KD; "
                        "glag: AFG + KD (default: %(default)s)")
    g = p.add_argument_group("generator (AFG), METHOD.md steps 1-7; unset = the method's preset")
    g.add_argument("--generate", type=_bool, metavar="BOOL", help="top classes up with generated samples")
    g.add_argument("--tukey-lambda", type=float, default=0.5, help="λ of x^λ; 1 disables (default: %(default)s)")
    g.add_argument("--k", type=int, default=2, help="support classes per tail sample (default: %(default)s)")
    g.add_argument("--weights", choices=WEIGHT_MODES,
                   help="support-class weights: n_i/d_i normalised (AFG) or 1/k (DC)")
    g.add_argument("--alpha", type=float, default=0.0, help="dispersion α added to Σ' (default: %(default)s)")
    g.add_argument("--alpha-mode", default="diag", choices=MODES,
                   help="diag: α·I; all: α on every entry, as DC does (default: %(default)s)")
    g.add_argument("--head-threshold", type=int, default=100,
                   help="head (support) classes have more training images than this (default: %(default)s)")
    g.add_argument("--n-max", type=int, help="top every class up to this count (default: the largest class)")
    g.add_argument("--adaptive-omega", type=_bool, metavar="BOOL", help="move ω by validation accuracy")
    g.add_argument("--omega-init", type=_omega_init, default="auto",
                   help="initial ω of tail classes, or 'auto': one run per --omega-grid value, the best on "
                        "validation top-1 kept (the paper gives 0.6 and 0.4); --method dc: 'auto' is DC's fixed "
                        "k/(k+1), a number replaces it (default: %(default)s)")
    g.add_argument("--omega-grid", type=float, nargs="+", default=[0.6, 0.4, 0.2, 0.0], metavar="W",
                   help="candidates of --omega-init auto; ties go to the earlier one (default: 0.6 0.4 0.2 0.0)")
    g.add_argument("--omega-workers", type=int, metavar="N",
                   help="candidates of --omega-init auto trained at once, each in its own process "
                        "(default: one per core when the head is small and all is in memory, else 1)")
    g.add_argument("--omega-step", type=float, default=0.05,
                   help="how far a tail class's ω moves after an epoch: up when its val accuracy rose above the "
                        "reference, down when it fell below; ω stays in [0, 1] (default: %(default)s)")
    g.add_argument("--omega-reference", default="best", choices=AdaptiveOmega.REFERENCES,
                   help="ω moves when val accuracy beats / falls below this reference (default: %(default)s)")
    g.add_argument("--omega-margin", type=float, default=0.0,
                   help="dead band around the reference, as a fraction (default: %(default)s)")
    g.add_argument("--backend", choices=("cuda", "numba", "torch"),
                   help="the sampler backend; one that cannot run here (no GPU or CuPy, no numba) falls back to the "
                        "next, with a warning (default: $GLAG_SAMPLER_BACKEND, else the fastest present)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads for the classifier; the order of its sums follows it, so give it to "
                        "runs you want to repeat elsewhere (default: 1 for heads of d·C <= 2^20 weights, which run "
                        "fastest single-threaded, else torch's choice)")
    g = p.add_argument_group("classifier training, METHOD.md steps 8-9")
    g.add_argument("--kd", type=_bool, metavar="BOOL", help="distil the stage-one logits on head classes")
    g.add_argument("--kd-temperature", type=float, default=2.0,
                   help="softmax temperature T of the KD term, > 0 (default: %(default)s)")
    g.add_argument("--kd-beta", type=float, default=2.0,
                   help="β of the KD weight τ(t) = (t/T)^β (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=40,
                   help="epochs; each draws a new set of generated features (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="samples a step (default: %(default)s)")
    g.add_argument("--lr", type=float, default=0.05, help="peak learning rate, cosine decay (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty of SGD (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the generated features, the shuffling and the initialisation; the same seed "
                        "gives the same run (default: %(default)s)")
    g = p.add_argument_group("memory (DESIGN.md, Scale)")
    g.add_argument("--max-memory", type=_bytes, metavar="SIZE",
                   help="memory budget, e.g. 4G, 512M (K/M/G = 2^10/2^20/2^30 bytes). When the in-memory path "
                        "would exceed it, class statistics are accumulated in one streaming pass and training "
                        "streams /train from the HDF5 file in bounded memory (default: no budget, all in memory)")
    g.add_argument("--stream-block-rows", type=int, metavar="N",
                   help="streaming: real rows read per block, rounded down to whole granules (HDF5 chunks) "
                        "and logged (default: cut from the budget)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not draw the PNG figures")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv=None) -> int:
    args = parse_args_with_config(build_parser(), argv, kind="stage2")
    setup_logging(args.verbose)
    from glag.metrics import format_table
    from glag.stage2 import Stage2Config, train_stage2

    cfg = config_from_args(Stage2Config, args)
    metrics = train_stage2(cfg, resume=args.resume)
    if args.plots:
        from pathlib import Path

        from glag.plots import plot_omega, plot_omega_selection, plot_per_class

        out = Path(cfg.out)
        plot_per_class(metrics, out / "per_class_test.png")
        if "omega_selection" in metrics:
            plot_omega_selection(metrics, out / "omega_init.png")
        if (out / "omega.json").exists():
            om = json.loads((out / "omega.json").read_text())
            plot_omega(om["history"], om["tail_classes"], metrics["class_counts"], out / "omega.png")
    rows = {f"stage one, {k}": v for k, v in metrics["stage1"].items()}
    rows.update({f"{cfg.method}, {k}": v for k, v in metrics["stage2"].items()})
    if "omega_selection" in metrics:
        print(f"ω_init chosen on val: {metrics['omega_init_selected']:g} (candidates, val split:)")
        print(format_table({f"ω_init {w}": v for w, v in metrics["omega_selection"].items()}))
    print(f"stage two ({cfg.method}), best epoch {metrics['best_epoch']} chosen on val; run folder {cfg.out}")
    print(format_table(rows))
    return 0


def cli(argv=None) -> int:
    """The ``glag-afg-train`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, resume_hint(build_parser))


if __name__ == "__main__":
    sys.exit(cli())
