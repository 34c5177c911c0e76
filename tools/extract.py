"""Extract a stage-one model's features, labels and logits (the KD teacher) to one HDF5 file.

    python tools/extract.py --checkpoint runs/fmnist-graloss/best.pt --out feats.h5
    torchrun --nproc_per_node 2 tools/extract.py --checkpoint runs/fmnist-graloss/best.pt --out feats.h5

The file has groups /train, /val, /test with features (N×d), labels, index and logits (N×C),
and root attributes (num_classes, feature_dim, class_counts, backbone, checkpoint_sha256, ...).
It is written to <out>.partial and renamed when complete; if the run is interrupted, the same
command resumes it. Read it with glag.features.open_features or plain h5py.

Under torchrun each process writes its shard of every split to <out>.rank<r>of<N> (resumable
too), and rank 0 merges them into <out>: the same file as a one-process run with the same
--batch-size.
"""
from __future__ import annotations

import argparse
import sys

if __package__ in (None, ""):
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools._common import cli_main, int_at_least, setup_logging
else:
    from ._common import cli_main, int_at_least, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glag-extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a stage-one checkpoint (best.pt or last.pt of a run)")
    p.add_argument("--out", default="feats.h5", help="the feature file to write (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="storage type of the features; float16 halves their share of the file (the logits stay "
                        "float32), read back as float32 "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=512,
                   help="images per forward pass; a resumed run must use the same (default: %(default)s)")
    p.add_argument("--data-root",
                   help="where the images are, if not where the stage-one run found them: replaces the run's "
                        "--data-root (for a list dataset, its --image-root, the folder the list files' paths "
                        "are relative to). It must hold the samples the run was trained on (checked against "
                        "the run folder's indices.npz)")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=("train", "val", "test"),
                   help="which splits to write (default: all three)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing complete --out file")
    p.add_argument("--num-workers", type=int_at_least(0), default=0,
                   help="data-loading processes (default: %(default)s)")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from glag import distributed

    distributed.init_from_env()  # no-op without torchrun
    main_process = distributed.is_main()
    setup_logging(args.verbose, main_process=main_process)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        from glag.extract import extract_features

        path = extract_features(args.checkpoint, args.out, batch_size=args.batch_size, dtype=args.dtype,
                                data_root=args.data_root, overwrite=args.overwrite, num_workers=args.num_workers,
                                progress=args.progress, splits=args.splits)
    finally:
        distributed.cleanup()
    if main_process:
        print(f"features written to {path}")
    return 0


def cli(argv=None) -> int:
    """The ``glag-extract`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, "run the same command again: the extraction resumes from its .partial file")


if __name__ == "__main__":
    sys.exit(cli())
