"""`python -m train.export RUN_DIR --format torch|nir [--out PATH] [--dt SECONDS] [key=value ...]`

A finished run's network for inference, tdBN folded into the weights (`models.deploy`).

- `--format torch` writes `RUN_DIR/export/model_folded.pt`, a `models.deploy.folded_checkpoint`:
  the timm name and factory arguments of the model and the folded state dict (a plain dict,
  `weights_only`-loadable); `models.deploy.load_folded(path)` rebuilds the folded module, which
  takes every input the model takes (images, sequences of any length, `forward_steps` streams).
  A traced program (TorchScript, `torch.export`) would unroll the time loop and fix T and the
  input form, so the module is rebuilt from code instead.
- `--format nir` writes `RUN_DIR/export/model.nir`, the folded network as a NIR graph for
  neuromorphic tool chains (`nir.read(path)`; neuron mapping and what is refused in
  models/deploy.py), for one step of the data set's input shape (from its meta.json). `--dt`
  is the consumer's time step in seconds (default 1e-4, `models.deploy.DEFAULT_NIR_DT`: the one
  snnTorch 1.0's importer assumes; give Norse's `from_nir` the same `dt=`): every neuron's tau
  and r are written so that one Euler step of dt is one step of the trained model, and the
  graph's metadata `dt` says which step that is.

A brought network (`model.name=package.module:factory`, `models.foreign`) has no folded form and
no NIR mapping: refused in one line.

The weights are `best_model.pt`, or with `eval.checkpoint=last` the newest step checkpoint, as
for `python -m train.evaluate`; overrides change the saved config, e.g. `data.path` when the data
set moved (its meta.json gives the classes and the input shape). Files are written under a
temporary name and renamed. Exit codes: 0 written, 2 a user error (no run there, missing weights
or data, a setting NIR cannot express), one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from data_pipelines.common import DataError
from data_pipelines.meta import Meta
from data_pipelines.registry import read_meta
from data_pipelines.registry import spec as data_spec
from models.deploy import DEFAULT_NIR_DT, NIRExportError, fold_model, folded_checkpoint, load_folded, to_nir
from models.names import is_factory_path
from train.checkpoints import CheckpointError
from train.config import Config, ConfigError, load_config
from train.build import build_model, model_kwargs
from train.evaluate import load_weights
from train.run_dir import RunDir

USER_ERROR_EXIT_CODE = 2
DEFAULT_FILES = {"torch": "model_folded.pt", "nir": "model.nir"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.export",
        description="Write a run's network, tdBN folded into the weights, as a torch file or a NIR graph.")
    parser.add_argument("run_dir", type=Path, help="a run directory (runs/<run.name>) holding config.yaml")
    parser.add_argument("--format", required=True, choices=sorted(DEFAULT_FILES),
                        help="torch: folded state dict + rebuild recipe; nir: NIR graph")
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default RUN_DIR/export/model_folded.pt or model.nir)")
    parser.add_argument("--dt", type=float, default=None,
                        help=f"nir: the consumer's time step in seconds (default {DEFAULT_NIR_DT:g}, snnTorch's)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.path=data/digits")
    args = parser.parse_intermixed_args(argv)
    try:
        path, source = export_run(args.run_dir, args.format, args.out, args.overrides, dt=args.dt)
    except (ConfigError, DataError, NIRExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(f"exported {args.run_dir} ({source}, tdBN folded) as {args.format}: wrote {path}", flush=True)
    return 0


def export_run(run_dir: Path, fmt: str, out: Path | None = None,
               overrides: list[str] = (), *, dt: float | None = None) -> tuple[Path, str]:
    """Fold the run's trained model and write it as `fmt` ("torch" or "nir"); `dt`: the NIR
    consumer's time step in seconds (None: `DEFAULT_NIR_DT`).

    Returns (the file written, the weights file it came from). Raises `ConfigError`/`DataError`
    for a missing run, weights or data, a brought model or `--dt` with torch, `NIRExportError`
    for what NIR cannot express.
    """
    run_dir = Path(run_dir)
    if dt is not None and fmt != "nir":
        raise ConfigError(f"--dt is the NIR consumer's time step; it does not apply to --format {fmt}")
    cfg = load_config(RunDir(run_dir).require().config, overrides)
    if is_factory_path(cfg.model.name):
        raise ConfigError(f"model.name={cfg.model.name} is a brought network: export folds tdBN and maps "
                          "our networks' layers, which it does not have; save its state dict from "
                          f"{run_dir}/best_model.pt instead")
    meta = read_meta(cfg.data.path, cfg.data.dataset)
    weights, source, _ = load_weights(cfg, run_dir)
    model = build_model(cfg, meta)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ConfigError(f"{run_dir / source} does not fit model.name={cfg.model.name} as config.yaml "
                          f"builds it ({str(e).splitlines()[0]})") from None
    folded = fold_model(model)
    out = Path(out) if out is not None else RunDir(run_dir).export_dir / DEFAULT_FILES[fmt]
    if fmt == "torch":
        blob = folded_checkpoint(folded, cfg.model.name, model_kwargs(cfg, meta))
        _check_rebuilds(blob, folded)
        _write_atomically(out, lambda tmp: torch.save(blob, tmp))
    else:
        import nir

        graph = to_nir(folded, input_shape(cfg, meta), DEFAULT_NIR_DT if dt is None else dt)
        _write_atomically(out, lambda tmp: nir.write(tmp, graph))
    return out, source


def _check_rebuilds(blob: dict[str, Any], folded: torch.nn.Module) -> None:
    """The file must give back this model: fail at export, not on the machine that loads it."""
    rebuilt = load_folded(blob)
    if repr(rebuilt) != repr(folded) or getattr(rebuilt, "T", None) != getattr(folded, "T", None):
        raise RuntimeError("the folded checkpoint's recipe (train.build.model_kwargs) no longer "
                           "rebuilds the model train.build.build_model builds; update the recipe")


def input_shape(cfg: Config, meta: Meta) -> tuple[int, ...]:
    """One step of one sample of the data set: `(C, H, W)` for images and frames, `(F,)` for
    feature sequences; ImageNet (variable size) at the validation resolution."""
    height, width = meta.height, meta.width
    if data_spec(meta.dataset).resolution is not None and not height:  # variable size: resized
        height = width = data_spec(meta.dataset).resolution(cfg.data, False, 0)
    if height and width:
        return meta.in_chans, int(height), int(width)
    return (meta.in_chans,)


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, fsync, rename to `path`: never a half-written file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
