"""`python -m data_pipelines.build <dataset> [--src PATH] --out PATH [options]`: write .beton files.

    python -m data_pipelines.build digits --out data/digits
    python -m data_pipelines.build seqdigits --out data/seqdigits
    python -m data_pipelines.build cifar10 --src /data/cifar-10-batches-py --out data/cifar10
    python -m data_pipelines.build imagenet --src /data/imagenet --out data/imagenet \
        --write-mode proportion --max-resolution 500 --jpeg-quality 90 --compress-probability 0.5
    python -m data_pipelines.build dvs --set cifar10dvs --src /data --out data/cifar10dvs --T 10 --size 48

An existing build in --out is kept unless --force. Exit codes: 0 done (or kept), 2 user error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import DataError, is_built, resolve_workers
from .dvs import BIN_BY, DVS_SETS, DvsOptions
from .imagenet import WRITE_MODES, ImageFieldOptions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_pipelines.build",
                                     description="Write a data set into FFCV .beton files.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")

    def add(name: str, help_: str, needs_src: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        if needs_src:
            p.add_argument("--src", required=True, type=Path, help="where the raw files are")
        p.add_argument("--out", required=True, type=Path, help="output directory")
        p.add_argument("--force", action="store_true", help="rebuild even if --out holds a build")
        p.add_argument("--workers", type=int, default=0,
                       help="worker processes (default: all available cores)")
        return p

    add("digits", "scikit-learn's handwritten digits (embedded demo set)", needs_src=False)
    add("seqdigits", "the same digits as sequences: row t of each image is time step t",
        needs_src=False)
    add("cifar10", "CIFAR-10 python pickle batches (cifar-10-batches-py)", needs_src=True)
    add("cifar100", "CIFAR-100 python pickle batches (cifar-100-python)", needs_src=True)

    img = add("imagenet", "ImageFolder tree: SRC/train/<class>/*, SRC/val/<class>/*", needs_src=True)
    defaults = ImageFieldOptions()
    img.add_argument("--write-mode", choices=WRITE_MODES, default=defaults.write_mode)
    img.add_argument("--max-resolution", type=int, default=defaults.max_resolution,
                     help="longest side in px (0 = keep)")
    img.add_argument("--jpeg-quality", type=int, default=defaults.jpeg_quality)
    img.add_argument("--compress-probability", type=float, default=defaults.compress_probability,
                     help="share of images stored as JPEG in 'proportion' mode")

    dvs = add("dvs", "event data read with tonic, binned to T frames", needs_src=True)
    dvs_defaults = DvsOptions()
    dvs.add_argument("--set", dest="dvs_set", choices=DVS_SETS, required=True)
    dvs.add_argument("--T", type=int, default=dvs_defaults.T, help="frames per recording")
    dvs.add_argument("--bin-by", choices=BIN_BY, default=dvs_defaults.bin_by,
                     help="equal event counts (default) or equal durations per frame")
    dvs.add_argument("--size", type=int, default=dvs_defaults.size,
                     help="downsample so the longer side is SIZE px (0 = sensor size)")
    dvs.add_argument("--split-seed", type=int, default=dvs_defaults.split_seed,
                     help="seed of CIFAR10-DVS's 9:1 per-class split")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Build the data set named in `argv`; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if is_built(args.out) and not args.force:
            print(f"{args.dataset}: {args.out} already holds a build; kept (use --force to rebuild)")
            return 0
        workers = resolve_workers(args.workers)
        if args.dataset == "digits":
            from .digits import build_digits
            build_digits(args.out, workers)
        elif args.dataset == "seqdigits":
            from .seqdigits import build_seqdigits
            build_seqdigits(args.out, workers)
        elif args.dataset in ("cifar10", "cifar100"):
            from .cifar import build_cifar
            build_cifar(args.dataset, args.src, args.out, workers)
        elif args.dataset == "imagenet":
            from .imagenet import build_imagenet
            options = ImageFieldOptions(args.write_mode, args.max_resolution, args.jpeg_quality,
                                        args.compress_probability)
            build_imagenet(args.src, args.out, workers, options)
        else:
            from .dvs import build_dvs
            options = DvsOptions(args.dvs_set, args.T, args.bin_by, args.size, args.split_seed)
            build_dvs(args.src, args.out, workers, options)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable --out, disk full: the user's to fix, one line
        print(f"error: {args.dataset}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
