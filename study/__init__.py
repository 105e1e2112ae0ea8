"""The functional-roles study (Yin et al. 2024) as a job: `python -m study run` trains every
variant x seed of a config's grid (study/grid.py), `python -m study report` reads them from MLflow
and decides the paper's findings by paired comparisons over seeds (study/findings.py, stats.py).

study/ sits above train/ (it may import train, never the reverse) and, but for `run`, stays light:
MLflow, matplotlib, numpy/scipy and the standard library, no torch or models.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename, so a
    reader never sees a half-written file. On an exception the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
