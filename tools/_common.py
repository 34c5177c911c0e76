"""Shared bits of the command-line tools: logging set-up, data arguments, JSON config defaults."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading


def setup_logging(verbose: bool = False, main_process: bool = True) -> None:
    """Log to stderr with timestamps; tqdm bars share the terminal. Under torchrun only the main
    process (rank 0) logs at INFO/DEBUG; the others log warnings and errors, tagged with their rank."""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if not main_process:
        level = logging.WARNING
        fmt = f"%(asctime)s %(levelname)s [rank {os.environ.get('RANK', '?')}] %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    if not verbose:  # faiss logs its search for CPU-specific builds ("Could not load library with AVX2 ...")
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def cli_main(main, argv=None, on_interrupt="run the same command with --resume to continue") -> int:
    """Run a tool's ``main(argv)`` as a command. A :class:`glag.errors.UsageError` (a bad option,
    path or input file; its message names the problem and the fix) is printed without a
    traceback, exit status 2; Ctrl-C says how to go on (``on_interrupt``: a string, or a callable of
    ``argv`` returning one), exit status 130, and SIGTERM the same, exit status 143. ``main`` itself
    raises, so that tools calling each other (``pipeline``) stop at the first error."""
    from glag.errors import UsageError

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "glag"
    handler = signal.SIG_DFL
    if threading.current_thread() is threading.main_thread():  # SIGTERM (kill, a job scheduler) as Ctrl-C
        handler = signal.signal(signal.SIGTERM, _terminated)
    try:
        return main(argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        hint = on_interrupt(argv) if callable(on_interrupt) else on_interrupt
        print(f"\n{prog}: {how}; what was finished is kept: {hint}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if threading.current_thread() is threading.main_thread():  # (None: a handler set outside Python)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if handler is None else handler)


def resume_hint(build_parser):
    """``on_interrupt`` for :func:`cli_main`: how to continue the run, naming its actual ``--out``
    (``build_parser()``: the tool's parser, made afresh for each use)."""
    def hint(argv) -> str:
        argv = sys.argv[1:] if argv is None else argv
        try:  # the --out the run used: the command line's, else --config's, else the default
            parser = build_parser()
            apply_json_defaults(parser, argv)
            pre = argparse.ArgumentParser(add_help=False)
            pre.add_argument("--out", default=parser.get_default("out"))
            out = pre.parse_known_args(argv)[0].out
        except (SystemExit, Exception):  # noqa: BLE001 - a hint must not fail the exit
            out = None
        return f"continue with --out {out} --resume" if out else "continue with --out <its folder> --resume"
    return hint


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Python next runs, as Ctrl-C is: the same clean stop (worker pools
    terminated, files complete or absent), exit status 143."""


def _terminated(signum, frame):
    raise Terminated()


def int_at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse names the option in its error)."""
    def parse(s: str) -> int:
        try:
            value = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value
    return parse


def number_above(low: float, inclusive: bool = False):
    """An argparse type: a finite number > ``low`` (>= with ``inclusive``)."""
    def parse(s: str) -> float:
        try:
            value = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                                             f"got {s}")
        return value
    return parse


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The dataset options shared by stage one and extraction."""
    from glag.data import DATASETS

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="fmnist-lt", choices=sorted(DATASETS),
                   help="fmnist-lt: Fashion-MNIST made long-tailed (Debian package dataset-fashion-mnist); "
                        "cifar100-lt: the LDAM-DRW protocol on a local CIFAR-100 python folder; "
                        "list: ImageNet-LT / iNaturalist split files; folder: an image-folder tree "
                        "DATA_ROOT/{train,val,test}/CLASS_NAME/*.jpg (or .png; val optional, else carved from "
                        "train) (default: %(default)s)")
    g.add_argument("--data-root", default=os.environ.get("GLAG_DATA_ROOT"),
                   help="folder holding the dataset (default: $GLAG_DATA_ROOT, else the dataset's usual place)")
    g.add_argument("--imbalance-factor", type=float, default=100.0,
                   help="n_max / n_min of the exponential LT profile (default: %(default)s)")
    g.add_argument("--n-max", type=int, default=500, help="images of the largest class (default: %(default)s)")
    g.add_argument("--val-per-class", type=int, default=20,
                   help="balanced validation images per class, taken from the unused train images "
                        "(default: %(default)s)")
    g.add_argument("--train-list", help="list dataset: train split file, one 'relative/path label' a line")
    g.add_argument("--val-list", help="list dataset: validation split file")
    g.add_argument("--test-list", help="list dataset: test split file")
    g.add_argument("--image-root", help="list dataset: folder the paths in the split files are relative to")
    g.add_argument("--image-size", type=int, default=224,
                   help="list and folder datasets: crop size (default: %(default)s)")


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None, kind: str | None = None) -> argparse.Namespace:
    """Parse ``argv`` (default: the command line) after ``--config`` has replaced the defaults.
    ``kind`` (:data:`glag.runs.RUN_KINDS`): the config must not be another kind of run's."""
    argv = sys.argv[1:] if argv is None else argv
    apply_json_defaults(parser, argv, kind)
    return parser.parse_args(argv)


def config_from_args(cls, args: argparse.Namespace):
    """Build the dataclass ``cls`` from the parsed options that are its fields."""
    fields = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in vars(args).items() if k in fields})


def apply_json_defaults(parser: argparse.ArgumentParser, argv, kind: str | None = None) -> None:
    """``--config run/config.json`` replaces the parser's defaults; flags on the command line still win.

    ``--resume`` without ``--config`` does the same with the run's own ``<out>/config.json``, so
    ``--out <run> --resume`` alone continues a run with the options it was started with (a flag
    that contradicts them is refused by the training code, naming the option)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--resume", action="store_true")
    pre.add_argument("--out", default=parser.get_default("out"))
    known, _ = pre.parse_known_args(argv)
    has_resume = any(a.dest == "resume" for a in parser._actions)
    source, quiet = known.config, False
    if (not source and has_resume and known.resume and known.out
            and os.path.isfile(os.path.join(known.out, "config.json"))):
        source, quiet = os.path.join(known.out, "config.json"), True  # it also holds what the run resolved
    if not source:
        return
    try:
        with open(source, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        parser.error(f"cannot read {'--config ' if not quiet else ''}{source}: {exc}")
    if not isinstance(values, dict):
        parser.error(f"{source} holds a JSON {type(values).__name__}, not an object of option values "
                     f"(as a run's config.json does)")
    from glag.runs import check_run_kind

    check_run_kind(values, kind, source if not quiet else known.out)  # before its options are read as ours
    for action in parser._actions:  # argparse checks choices only for values given on the command line
        if action.choices is None or action.dest not in values:
            continue
        given = values[action.dest]
        for v in (given if isinstance(given, list) and action.nargs in ("+", "*") else [given]):
            if v not in action.choices and not (v is None and action.default is None):
                parser.error(f"{source}: {action.dest} {v!r} is not one of {', '.join(map(str, action.choices))}")
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(values) - dests - {"extra", "run_kind"})
    if unknown and not quiet:
        logging.getLogger(__name__).warning("--config keys not known to this tool, ignored: %s", unknown)
    parser.set_defaults(**{k: v for k, v in values.items() if k in dests})
    for action in parser._actions:  # a value from the file satisfies a required option
        if action.required and action.dest in values:
            action.required = False
