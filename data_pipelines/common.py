"""Pieces every builder and loader shares: the error type, the output layout, core counting.

Output layout of one built data set (a directory)::

    train.beton  val.beton   FFCV files; fields `image` (or `frames`, `sequence`) and `label`
    meta.json                what the loader needs (classes, shape, T, counts, mean/std)
    classes.json             class name -> label index (ImageFolder sets; others list them in meta)
    skipped.txt              inputs that could not be read, one per line with the reason

Everything is written into a hidden temporary directory inside the output directory and moved
into place at the end, `meta.json` last, so a directory with a `meta.json` is a finished build.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TRAIN_FILE = "train.beton"
VAL_FILE = "val.beton"
META_FILE = "meta.json"
CLASSES_FILE = "classes.json"
REPORT_FILE = "skipped.txt"
OUTPUT_FILES = (TRAIN_FILE, VAL_FILE, META_FILE)

#: Version of the layout above, recorded in meta.json so a loader can refuse a stale build.
FORMAT_VERSION = 1


class DataError(Exception):
    """A problem the user can fix (missing files, bad option); the message is one line."""


def available_cores() -> int:
    """CPU cores this process may use: the Slurm allocation, else the affinity mask.

    Under Slurm, `SLURM_CPUS_PER_TASK` is the task's share. Without it, the affinity mask is
    divided among the ranks torchrun started on this node (`LOCAL_WORLD_SIZE`), because each
    of them would otherwise believe it owns the whole machine.
    """
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE", "1")
    local_ranks_n = int(local_ranks) if local_ranks.isdigit() and int(local_ranks) > 0 else 1
    return max(1, cores // local_ranks_n)


def resolve_workers(requested: int) -> int:
    """Worker count: `requested` if positive, all available cores if <= 0, never more than those."""
    cores = available_cores()
    return cores if requested <= 0 else min(requested, cores)


def is_built(directory: str | Path) -> bool:
    """True when `directory` holds a finished build (both .beton files and meta.json)."""
    directory = Path(directory)
    return all((directory / name).is_file() for name in OUTPUT_FILES)


@contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory inside `out`; on success move its files into `out`.

    `meta.json` moves last, so readers never see a meta.json beside half-written .beton files.
    On failure the temporary directory is removed and `out` is left as it was.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".partial-{os.getpid()}"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir() if p.name != META_FILE)
        # A stale report from an earlier build would describe inputs this build did not skip.
        if REPORT_FILE not in names and (out / REPORT_FILE).exists():
            (out / REPORT_FILE).unlink()
        for name in names + [META_FILE]:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as indented JSON (the files are meant to be read by people too)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_report(stage: Path, skipped: list[tuple[str, str]]) -> None:
    """Write `skipped.txt` (path <TAB> reason) when any input was skipped."""
    if skipped:
        lines = [f"{path}\t{reason}" for path, reason in sorted(skipped)]
        (stage / REPORT_FILE).write_text("\n".join(lines) + "\n")


def summary_line(dataset: str, out: Path, counts: dict[str, int], skipped: int) -> str:
    """The one line a builder prints at the end."""
    parts = ", ".join(f"{split} {n}" for split, n in counts.items())
    report = f" (listed in {out / REPORT_FILE})" if skipped else ""
    return f"{dataset}: wrote {parts} samples to {out}; skipped {skipped} unreadable inputs{report}"


def eprint(*args: object) -> None:
    """Print to stderr (progress bars and diagnostics; stdout keeps the summary line)."""
    print(*args, file=sys.stderr)
