"""The one owner of checkpoint files: write, commit, verify, read back, keep the newest K.

A checkpoint of global step N is `checkpoints/step-<N>.pt` (a plain dict of tensors and Python
scalars, `weights_only`-loadable), DeepSpeed's per-rank shards under `checkpoints/deepspeed/step-<N>/`
when the engine has them, and `checkpoints/step-<N>.json`, the manifest, written last: the format
version, the checkpoint's top-level scalars (step, epoch, MLflow run id, config hash: read without
unpickling anything) and the size and sha256 of every file above. Each file goes to a temporary
name, is fsynced and renamed, the manifest last, so a step exists only once it is complete.

On load a checkpoint is used only if its manifest is there, every file it lists has its size and
sha256 (a flipped bit in a tensor payload unpickles fine, the hash does not match), and the state
holds every part the run needs; otherwise one warning line says what was wrong and the previous
complete one is used. A format version this release cannot read is refused in one line.
DeepSpeed's own `latest` file is neither written nor read: the manifest names the shard tag.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch

from train import distributed

FORMAT_VERSION = 1           # what this release writes; bump it when a checkpoint's contents change
READABLE_VERSIONS = (1,)     # what it reads (tests/train/fixtures holds one of each)
SHARDS = "deepspeed"          # checkpoints/deepspeed/step-<step>/: the engine's per-rank shards
SHARD_TAG = "deepspeed_tag"   # the state's pointer to them
_STEP = re.compile(r"^step-(\d+)\.(pt|json)$")
_HASH_CHUNK = 2**22


class Stateful(Protocol):
    """What a checkpoint part is: anything with torch's state_dict / load_state_dict pair."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any], /) -> Any: ...


class Sharded(Protocol):
    """State that an engine writes per rank into a folder of its own (DeepSpeed's ZeRO shards)."""

    def save_shards(self, folder: Path, tag: str) -> None: ...

    def load_shards(self, folder: Path, tag: str) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint the user must act on (another model's, another release's): one line."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint holds another model's weights (the user resumed with other settings)."""


class CheckpointFormatError(CheckpointError):
    """The checkpoint was written in a format version this release does not read."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous ones stand."""


class Unusable(Exception):
    """This checkpoint is incomplete or corrupt (the message says how): use the previous one."""


@dataclass(frozen=True)
class CheckpointSummary:
    """What a complete checkpoint is, from its manifest alone (no tensor is read).

    path: the state file, `checkpoints/step-<step>.pt`.
    step: global optimizer steps done; epoch: epochs done; batch: micro-batches of `epoch` done.
    mlflow_run_id: the MLflow run it logs into (None before the store first answered).
    config_hash: `train.config.config_hash` of the run's resolved config.
    format_version: the checkpoint format it was written in.
    holds_model: False when the weights live in DeepSpeed's shards, not in the state file.
    """
    path: Path
    step: int
    epoch: int
    batch: int
    mlflow_run_id: str | None
    config_hash: str
    format_version: int
    holds_model: bool

    @classmethod
    def from_manifest(cls, path: Path, manifest: dict[str, Any]) -> "CheckpointSummary":
        scalars = manifest["scalars"]
        missing = [k for k in ("epoch", "batch", "global_step", "mlflow_run_id", "config_hash") if k not in scalars]
        if missing:  # a writer that forgot a field is our bug: never a silent default
            raise KeyError(f"{_manifest_of(path)} lacks {', '.join(missing)} (format version "
                           f"{manifest['format_version']}): not a checkpoint of `python -m train`")
        return cls(path=path, step=int(scalars["global_step"]), epoch=int(scalars["epoch"]),
                   batch=int(scalars["batch"]), mlflow_run_id=scalars["mlflow_run_id"],
                   config_hash=str(scalars["config_hash"]), format_version=int(manifest["format_version"]),
                   holds_model="model" in manifest["keys"])


class Checkpointer:
    """The one owner of a run's checkpoints, torchtitan-shaped: built once from the run's
    stateful parts, then only `save(step)` and `load()`; with no parts, a reader (`newest`, `read`).

    folder: the run's `checkpoints/` directory (`train.run_dir.RunDir.checkpoints`).
    parts: name -> Stateful; each is one entry of the checkpoint dict (model, optimizer,
        scheduler, scaler, ema). `optional` names may be missing from an older checkpoint.
    train_state: a Stateful whose (flat) state dict becomes the top-level scalars of the
        checkpoint (epoch, batch, step, rng, ...), so checkpoints stay one plain dict;
        `required` names the ones a checkpoint must hold to be resumed (the RNG and loader state).
    sharded: an engine that writes per-rank shards into `checkpoints/deepspeed/<tag>`.
    best: where `save_best` writes the best weights (`RunDir.best_model`).
    is_main: rank 0 writes the files and decides which checkpoint every rank loads.
    """

    def __init__(self, folder: Path, keep: int = 3, parts: dict[str, Stateful] | None = None, *,
                 train_state: Stateful | None = None, sharded: Sharded | None = None,
                 optional: frozenset[str] = frozenset(), required: frozenset[str] = frozenset(),
                 best: Path | None = None, is_main: bool = True):
        self.dir = Path(folder)
        self.best = best
        self.keep = max(1, keep)
        self.parts, self.train_state, self.sharded = dict(parts or {}), train_state, sharded
        self.optional, self.is_main = optional, is_main
        self.required = (frozenset(self.parts) - optional) | required | ({SHARD_TAG} if sharded else frozenset())
        self.loaded: Path | None = None  # the checkpoint the last load / newest returned

    def state_path(self, step: int) -> Path:
        return self.dir / f"step-{step:09d}.pt"

    def steps(self) -> list[int]:
        """Every step that has a file here (complete or not), newest first."""
        names = [p.name for p in self.dir.iterdir()] if self.dir.is_dir() else []
        shards = self.dir / SHARDS
        names += [f"{p.name}.pt" for p in shards.iterdir() if p.is_dir()] if shards.is_dir() else []
        return sorted({int(m.group(1)) for name in names if (m := _STEP.match(name))}, reverse=True)

    def paths(self) -> list[Path]:
        """The state files of committed checkpoints (a manifest exists; not verified), newest first."""
        return [self.state_path(s) for s in self.steps() if _manifest_of(self.state_path(s)).is_file()]

    # ------------------------------------------------------------------ the run's state
    def save(self, step: int) -> Path:
        """Every part as the checkpoint of global step `step`; keep the newest K (every rank)."""
        tag = f"step-{step:09d}"
        state = {name: part.state_dict() for name, part in self.parts.items()}
        if self.train_state is not None:
            state.update(self.train_state.state_dict())
        if self.sharded is not None:
            if self.is_main:  # a step written again (after a fall-back) is uncommitted first
                self._remove(step)
            distributed.barrier()
            self.sharded.save_shards(self.dir / SHARDS, tag)
            state[SHARD_TAG] = tag
            distributed.barrier()  # every rank's shard is on disk before rank 0 hashes it
        if self.is_main:
            self.write(state, step)
        return self.state_path(step)

    def load(self, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
        """Restore every part from the newest complete checkpoint (rank 0 verifies and chooses;
        every rank loads that one); returns its dict, or None when none was ever committed.
        Raises CheckpointError when every committed one is broken, CheckpointMismatch for
        another model's weights, CheckpointFormatError for a format version this release does
        not read."""
        decision: int | None | CheckpointError = None
        if self.is_main:
            try:
                found = self._newest_complete()
                decision = found[0] if found else None
                if found is None and self.paths():  # committed once, all broken: not a fresh start
                    decision = CheckpointError(
                        f"no usable checkpoint in {self.dir} (each is named above); move the directory "
                        "away to start from step 0, or restore a copy")
                elif found is None:
                    self._refuse_legacy()
            except CheckpointFormatError as e:  # refused on every rank, not only on rank 0
                decision = e
        decision = distributed.broadcast_object(decision)
        if isinstance(decision, CheckpointError):
            raise decision
        if decision is None:
            return None
        step = decision
        path = self.state_path(step)
        state = torch.load(path, map_location=map_location, weights_only=True)
        self.loaded = path
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

    def _refuse_legacy(self) -> None:
        """Raise CheckpointFormatError when an uncommitted step file is a whole checkpoint of a
        release before format 1 (it has no manifest and no format version): starting from step 0
        would prune it, losing the run. Debris of our own cut-short first write (unreadable, or
        carrying a format version) is left to the fresh start."""
        for path in (self.state_path(s) for s in self.steps()):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # a torn write of this release: debris
                continue
            if isinstance(state, dict) and "format_version" not in state:
                raise CheckpointFormatError(
                    f"{path} was written before checkpoint format {FORMAT_VERSION} (it has no manifest); "
                    f"resume it with the release that wrote it, or move {self.dir} away to start from step 0")

    # ------------------------------------------------------------------ reading
    def newest(self) -> CheckpointSummary | None:
        """The newest complete checkpoint's summary (manifest, sizes and sha256 verified,
        required parts present), or None; each one skipped is named in one warning line."""
        found = self._newest_complete()
        return CheckpointSummary.from_manifest(self.state_path(found[0]), found[1]) if found else None

    def _newest_complete(self) -> tuple[int, dict[str, Any]] | None:
        """(step, manifest) of the newest complete checkpoint, warning about each one skipped."""
        for step in self.steps():
            path = self.state_path(step)
            try:
                manifest = self._verify(path)
            except Unusable as e:
                if self.is_main:  # one plain line (a UserWarning would add a source line to the log)
                    print(f"warning: checkpoint {path} is not usable ({e}); falling back to the previous one",
                          file=sys.stderr, flush=True)
                continue
            self.loaded = path
            return step, manifest
        return None

    def read(self, checkpoint: CheckpointSummary, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The state dict of `checkpoint`, memory-mapped: only the tensors used are read from
        disk (the model's weights without the optimizer's state, say)."""
        return torch.load(checkpoint.path, map_location=map_location, weights_only=True, mmap=True)

    def _verify(self, path: Path) -> dict[str, Any]:
        """The manifest of the checkpoint at `path` once it is proven complete; raises Unusable
        (what is wrong) or CheckpointFormatError (another release's format)."""
        manifest_path = _manifest_of(path)
        if not manifest_path.is_file():
            raise Unusable("no manifest: the write was cut short before its commit")
        try:
            manifest = json.loads(manifest_path.read_text())
            version, files, keys = manifest["format_version"], manifest["files"], manifest["keys"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise Unusable(f"its manifest {manifest_path.name} is unreadable ({type(e).__name__}: {e})") from None
        if version not in READABLE_VERSIONS:
            raise CheckpointFormatError(
                f"{manifest_path} is checkpoint format version {version}; this release reads version(s) "
                f"{', '.join(map(str, READABLE_VERSIONS))}: resume it with the release that wrote it, "
                "or choose a new run.name")
        for name, expected in files.items():
            file = self.dir / name
            if not file.is_file():
                raise Unusable(f"{name} is missing")
            if file.stat().st_size != expected["size"]:
                raise Unusable(f"{name} is {file.stat().st_size} bytes, its manifest says {expected['size']}")
            if _sha256(file) != expected["sha256"]:
                raise Unusable(f"{name} does not match its manifest's sha256: corrupted after it was written")
        if path.name not in files:
            raise Unusable(f"its manifest does not list {path.name}")
        lacking = sorted(self.required - set(keys))
        if lacking:
            raise Unusable(f"it lacks {', '.join(lacking)}")
        return manifest

    # ------------------------------------------------------------------ files
    def write(self, state: dict[str, Any], step: int) -> Path:
        """`state` as the checkpoint of `step`: the state file, then the manifest over it and the
        shards `state[SHARD_TAG]` names (the commit); prune to the newest K. Rank 0 only."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path, manifest_path = self.state_path(step), _manifest_of(self.state_path(step))
        state = {**state, "format_version": FORMAT_VERSION}
        tmp, manifest_tmp = path.with_name(path.name + ".tmp"), manifest_path.with_name(f".{manifest_path.name}.tmp")
        shards = sorted(p for p in (self.dir / SHARDS / state[SHARD_TAG]).rglob("*") if p.is_file()) \
            if SHARD_TAG in state else []
        try:
            with _explained(path):
                _save_synced(state, tmp)
                files = {path.name: _entry(tmp), **{str(p.relative_to(self.dir)): _entry(p) for p in shards}}
                manifest = {"format_version": FORMAT_VERSION, "step": step, "keys": sorted(state),
                            "scalars": {k: v for k, v in state.items() if _is_scalar(v)}, "files": files}
                _write_synced(manifest_tmp, json.dumps(manifest, indent=1, sort_keys=True).encode())
                # The commit is two renames: a step written again (the epoch end after a periodic
                # save of the same step) is without a valid checkpoint only between them.
                os.replace(tmp, path)
                os.replace(manifest_tmp, manifest_path)
        finally:
            tmp.unlink(missing_ok=True)  # a full disk leaves no debris beside the previous files
            manifest_tmp.unlink(missing_ok=True)
        _fsync_dir(self.dir)
        self._prune(step)
        return path

    def _prune(self, committed: int) -> None:
        """Keep the K newest complete checkpoints up to `committed`; remove every other step's
        files (older ones, debris of cut-short writes, and steps after `committed` left by a
        history this run went back from). The manifest goes first: a crash midway leaves debris,
        never a committed checkpoint with files missing."""
        kept = [s for s in self.steps() if s <= committed and _manifest_of(self.state_path(s)).is_file()][:self.keep]
        for step in self.steps():
            if step not in kept:
                self._remove(step)

    def _remove(self, step: int) -> None:
        path = self.state_path(step)
        _manifest_of(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        shutil.rmtree(self.dir / SHARDS / path.stem, ignore_errors=True)

    def save_best(self, weights: dict[str, torch.Tensor]) -> Path:
        """`weights` as the run's best model (a state dict), atomically; rank 0 writes it."""
        if self.best is None:
            raise ValueError("this Checkpointer was built without a best-model path")
        if self.is_main:
            self.best.parent.mkdir(parents=True, exist_ok=True)
            _save_or_explain(weights, self.best)
        return self.best


def _manifest_of(state_path: Path) -> Path:
    return state_path.with_suffix(".json")


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


def _save_or_explain(obj: Any, final: Path) -> None:
    """torch.save to a temporary name, fsync, rename: never a half-written file under `final`;
    a failed write is one CheckpointWriteError (see `_explained`)."""
    tmp = final.with_name(final.name + ".tmp")
    try:
        with _explained(final):
            _save_synced(obj, tmp)
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no debris beside the previous file
    _fsync_dir(final.parent)


@contextlib.contextmanager
def _explained(final: Path) -> Iterator[None]:
    """A failed write (disk full, quota, permissions) as one CheckpointWriteError naming `final`,
    the reason and the free space."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as RuntimeError("[enforce fail at inline_container.cc...")
        # raised while handling the OSError; anything else is not a write failure.
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is None:
            raise
        free = shutil.disk_usage(final.parent).free / 2**20
        raise CheckpointWriteError(f"could not write {final} ({cause.strerror or cause}; {free:.0f} MiB free "
                                   "there); the previous checkpoints are intact: free space and rerun to resume "
                                   "from the newest") from None


def _save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    (the manifest, the resolved config, final metrics, eval results)."""
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
