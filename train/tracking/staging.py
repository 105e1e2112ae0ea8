"""Staged artifact copies: an artifact as it was when logged, kept until the journal sends it.

A journal record cannot hold a file, so it names a copy under `<run_dir>/tracking/staged/`,
made at the call (later changes to the original are not uploaded) and removed once uploaded.
The copy outlives a store outage and a restart, as the record does in the fallback file.
"""
from __future__ import annotations

import itertools
import shutil
import uuid
from pathlib import Path


class Staging:
    """Hands out fresh staging directories under `<run_dir>/tracking/staged/`."""

    def __init__(self, run_dir: Path):
        self.root = run_dir / "tracking" / "staged"
        self._count = itertools.count()

    def new_dir(self) -> Path:
        path = self.root / f"{next(self._count):05d}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def copy(self, path: Path) -> Path:
        """A copy of file or directory `path`, alone in a new staging directory."""
        dst = self.new_dir() / path.name
        if path.is_dir():
            shutil.copytree(path, dst)
        else:
            shutil.copy2(path, dst)
        return dst


def remove_orphans(run_dir: Path, carried: list[dict]) -> None:
    """Delete staged copies that no pending record refers to (left by a killed process)."""
    staged = Staging(run_dir).root
    if not staged.is_dir():
        return
    keep = {Path(r["cleanup"]).name for r in carried if r.get("cleanup")}
    for d in staged.iterdir():
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)
