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
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

_NAME = re.compile(r"^step-(\d+)\.pt$")


BEST_MODEL = "best_model.pt"
SHARDS = "deepspeed"          # checkpoints/deepspeed/step-<step>/: the engine's per-rank shards
SHARD_TAG = "deepspeed_tag"   # the manifest's pointer to them


class Stateful(Protocol):
    """What a checkpoint part is: anything with torch's state_dict / load_state_dict pair."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


class Sharded(Protocol):
    """State that an engine writes per rank into a folder of its own (DeepSpeed's ZeRO shards)."""

    def save_shards(self, folder: Path, tag: str) -> None: ...

    def load_shards(self, folder: Path, tag: str) -> None: ...


class CheckpointMismatch(ValueError):
    """The checkpoint holds another model's weights (the user resumed with other settings)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous ones stand."""


class Checkpointer:
    """The one owner of a run's checkpoints, torchtitan-shaped: built once from the run's
    stateful parts, then only `save(step)` and `load()`.

    parts: name -> Stateful; each is one entry of the checkpoint dict (model, optimizer,
        scheduler, scaler, ema). `optional` names may be missing from an older checkpoint.
    train_state: a Stateful whose (flat) state dict becomes the top-level scalars of the
        checkpoint (epoch, batch, step, rng, ...), so checkpoints stay one plain dict.
    sharded: an engine that writes per-rank shards into `checkpoints/deepspeed/<tag>`; the
        manifest written after them names the tag, so a manifest means a complete checkpoint.
    is_main: rank 0 writes the files; every rank calls `save`/`load` (the parts may gather).
    """

    def __init__(self, run_dir: Path, keep: int = 3, parts: dict[str, Stateful] | None = None, *,
                 train_state: Stateful | None = None, sharded: Sharded | None = None,
                 optional: frozenset[str] = frozenset(), is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep = max(1, keep)
        self.parts, self.train_state, self.sharded = dict(parts or {}), train_state, sharded
        self.optional, self.is_main = optional, is_main
        self.loaded: Path | None = None  # the checkpoint the last load / load_latest returned

    def paths(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    # ------------------------------------------------------------------ the run's state
    def save(self, step: int) -> Path:
        """Every part as the checkpoint of global step `step`; keep the newest K (every rank)."""
        tag = f"step-{step:09d}"
        state = {name: part.state_dict() for name, part in self.parts.items()}
        if self.train_state is not None:
            state.update(self.train_state.state_dict())
        if self.sharded is not None:
            self.sharded.save_shards(self.dir / SHARDS, tag)
            state[SHARD_TAG] = tag
        final = self.dir / f"{tag}.pt"
        if self.is_main:
            self.write(state, step)
        return final

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """Restore every part from the newest readable checkpoint; returns that checkpoint's
        dict (None when there is none). Raises CheckpointMismatch for another model's weights."""
        found = self.load_latest(map_location)
        if found is None:
            return None
        state, path = found
        for name, part in self.parts.items():
            if name not in state and name in self.optional:
                continue
            try:
                part.load_state_dict(state[name])
            except RuntimeError as e:  # missing/unexpected keys or shapes
                if name != "model":
                    raise
                detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
                raise CheckpointMismatch(f"{path} holds the weights of another model ({detail}); resume "
                                         "with the settings it was trained with, or choose a new run.name") from None
        if self.sharded is not None:
            self.sharded.load_shards(self.dir / SHARDS, state[SHARD_TAG])
        if self.train_state is not None:
            self.train_state.load_state_dict(state)
        return state

    # ------------------------------------------------------------------ files
    def write(self, state: dict[str, Any], step: int) -> Path:
        """`state` as the checkpoint file of `step` (atomic); prune to the newest K, shards too."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:09d}.pt"
        _save_or_explain(state, final)
        for old in self.paths()[self.keep:]:
            old.unlink(missing_ok=True)
        live = {p.stem for p in self.paths()}
        for folder in (self.dir / SHARDS).glob("step-*"):
            if folder.is_dir() and folder.name not in live:
                shutil.rmtree(folder, ignore_errors=True)
        return final

    def save_best(self, weights: dict[str, torch.Tensor]) -> Path:
        """`weights` as `<run_dir>/best_model.pt` (a state dict), atomically like a checkpoint;
        rank 0 writes it."""
        path = self.run_dir / BEST_MODEL
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _save_or_explain(weights, path)
        return path

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, as read (no part restored), or None; unreadable
        ones are skipped with a warning."""
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


def _save_or_explain(obj: Any, final: Path) -> None:
    """_save_atomically, with a failed write (disk full, quota, permissions) as one
    CheckpointWriteError naming the file, the reason and the free space."""
    try:
        _save_atomically(obj, final)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as RuntimeError("[enforce fail at inline_container.cc...")
        # raised while handling the OSError; anything else is not a write failure.
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is None:
            raise
        free = shutil.disk_usage(final.parent).free / 2**20
        raise CheckpointWriteError(f"could not write {final} ({cause.strerror or cause}; {free:.0f} MiB free there); "
                                   "the previous checkpoints are intact: free space and rerun to resume from "
                                   "the newest") from None


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
