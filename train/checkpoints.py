"""The one owner of checkpoint files: atomic save, newest-K retention, skip what is unreadable.

A checkpoint is `<run_dir>/checkpoints/step-<global step>.pt`, a plain dict of tensors and
Python scalars so it loads with `weights_only=True`. It is written to a `.tmp` name, fsynced and
renamed, so a crash never leaves a half-written file under a real name; a file that is corrupt
anyway (disk full, truncated copy) is skipped on load with a warning and the previous one used.
"""
from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NAME = re.compile(r"^step-(\d+)\.pt$")


BEST_MODEL = "best_model.pt"


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int = 3):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.loaded: Path | None = None  # the checkpoint the last load_latest returned

    def paths(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` as the checkpoint of global step `step`; keep the newest K."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:09d}.pt"
        _save_atomically(state, final)
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        return final

    def save_best(self, weights: dict[str, torch.Tensor]) -> Path:
        """`weights` as `<run_dir>/best_model.pt` (a state dict), atomically like a checkpoint."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / BEST_MODEL
        _save_atomically(weights, path)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, or None; unreadable ones are skipped with a warning."""
        for path in self.paths():
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # truncated zip, bad pickle, ...: all mean "not usable"
                # One plain line on stderr (a UserWarning would add a source line to the log).
                reason = str(e).splitlines()[0] if str(e) else ""
                print(f"warning: checkpoint {path} is unreadable ({type(e).__name__}: {reason}); "
                      "falling back to the previous one", file=sys.stderr, flush=True)
                continue
            self.loaded = path
            return state, path
        return None


def _save_atomically(obj: Any, final: Path) -> None:
    """torch.save to a temporary name, fsync, rename: never a half-written file under `final`."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no debris beside the previous file
        raise
    _fsync_dir(final.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from, as plain Python values: they load with
    `weights_only=True` and travel through `all_gather_object` (tensors there do not)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary name, fsync and rename: never a half-written file
    (the resolved config, final metrics, eval results)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
