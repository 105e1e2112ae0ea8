"""`python -m data_pipelines.build <dataset> [--src PATH] --out PATH [options]`: write .beton files.

    python -m data_pipelines.build digits --out data/digits
    python -m data_pipelines.build seqdigits --out data/seqdigits
    python -m data_pipelines.build cifar10 --src /data/cifar-10-batches-py --out data/cifar10
    python -m data_pipelines.build imagenet --src /data/imagenet --out data/imagenet \
        --write-mode proportion --max-resolution 500 --jpeg-quality 90 --compress-probability 0.5
    python -m data_pipelines.build dvs --set cifar10dvs --src /data --out data/cifar10dvs --T 10 --size 48
    python -m data_pipelines.build dvs --set nmnist --src /data --out data/nmnist_3ms \
        --frame-ms 3 --window-ms 300 --eval-frame-ms 1,2,5,10
    python -m data_pipelines.build shd --src /data/shd --out data/shd --T 100 --window-ms 1000
    python -m data_pipelines.build delayed_xor --out data/delayed_xor --delay 180
    python -m data_pipelines.build mnist1d --out data/mnist1d

The data sets and their options are the specs in registry.py.

An existing build in --out is kept unless --force. Exit codes: 0 done (or kept), 2 user error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import DataError, is_built, resolve_workers
from .registry import SPECS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.build",
                                     description="Write a data set into FFCV .beton files.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for spec in SPECS.values():
        p = sub.add_parser(spec.name, help=spec.help)
        if spec.needs_src:
            p.add_argument("--src", required=True, type=Path, help="where the raw files are")
        p.add_argument("--out", required=True, type=Path, help="output directory")
        p.add_argument("--force", action="store_true", help="rebuild even if --out holds a build")
        p.add_argument("--workers", type=int, default=0,
                       help="worker processes (default: all available cores)")
        spec.options(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the data set named in `argv`; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if is_built(args.out) and not args.force:
            print(f"{args.dataset}: {args.out} already holds a build; kept (use --force to rebuild)")
            return 0
        SPECS[args.dataset].build(args, resolve_workers(args.workers))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable --out, disk full: the user's to fix, one line
        print(f"error: {args.dataset}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
