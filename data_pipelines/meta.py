"""`Meta`: what a built data set says about itself (its `meta.json`), written and read by one class.

A builder fills a `Meta` and `Meta.write`s it last into the build directory; the loaders, the
config check, the model factory and the measures read it back with `Meta.read`, and only through
its typed fields. Facts that only describe how a build was made (its split method, JPEG quality,
sensor size...) are kept in `details`, for people; no code reads them. Stdlib only: the config
schema reads a build's `Meta` on a login node.

The file is one flat JSON object: the fields below plus the entries of `details`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .common import FORMAT_VERSION, META_FILE, DataError


@dataclass(frozen=True)
class Meta:
    """A built data set (`meta.json`): sizes, shapes, time steps, normalisation.

    Images are stored `[in_chans, height, width]` (height/width None when variable, as ImageNet's);
    sequences `[T, in_chans]` (in_chans = features per step); event frames `[T, 2, height, width]`.
    """

    dataset: str                     # the registry's name (data.dataset)
    num_classes: int
    classes: list[str]               # label index -> class name
    in_chans: int                    # input channels, or features per step for sequences
    counts: dict[str, int]           # samples per split: {"train": N, "val": M, ...}
    height: Optional[int] = None     # px; None for sequences and variable-size images
    width: Optional[int] = None
    T: Optional[int] = None          # time steps of a sample; None = static (the model picks T)
    readout_from: int = 0            # first step the readout counts (0 = all; delayed XOR: 2nd pattern)
    frame_ms: float = 0.0            # duration of one frame/step in ms (0 = not binned by duration)
    # Extra evaluation splits beside train/val: name -> {"frame_ms": ms, "T": steps}; their files
    # are <name>.beton and their sizes counts[name] (the event sets' frame-duration shift;
    # SSC's test file, at the same frame_ms).
    eval_splits: dict[str, dict] = field(default_factory=dict)
    mean: Optional[list[float]] = None  # normalisation per channel (or one value), stored units
    std: Optional[list[float]] = None
    pixel_max: float = 255           # largest stored value (255 for 8-bit RGB, 16 for digits)
    dtype: str = "uint8"             # stored sample dtype
    skipped: int = 0                 # inputs the builder could not read (listed in skipped.txt)
    source: str = ""                 # where the data came from (a path or a package)
    details: dict[str, Any] = field(default_factory=dict)  # how the build was made, for people
    format_version: int = FORMAT_VERSION

    def write(self, directory: str | Path) -> Path:
        """Write `directory/meta.json` (indented, for people too); returns its path."""
        path = Path(directory) / META_FILE
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "details"}
        clash = set(record) & set(self.details)
        if clash:
            raise ValueError(f"Meta.details repeats typed fields {sorted(clash)}")
        path.write_text(json.dumps({**record, **self.details}, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path,
             command: str = "python -m data_pipelines.build DATASET --out DIR") -> Meta:
        """Read `directory/meta.json`; raises `DataError` (one line quoting `command`, the shell
        command that builds the set there) when it is missing, unreadable, of another format
        version or lacks a field. `registry.read_meta` passes the data set's own command."""
        directory = Path(directory)
        path = directory / META_FILE
        if not path.is_file():
            raise DataError(f"no built data set at {directory} ({path} is missing); "
                            f"build it with: {command}")
        rebuild = f"rebuild with {command} --force"
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is unreadable ({e}); {rebuild}") from None
        if record.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path} has format version {record.get('format_version')}, this code "
                            f"reads {FORMAT_VERSION}; {rebuild}")
        typed = {f.name for f in dataclasses.fields(cls)} - {"details"}
        known = {k: v for k, v in record.items() if k in typed}
        try:
            return cls(**known, details={k: v for k, v in record.items() if k not in typed})
        except TypeError as e:  # a required field is missing
            raise DataError(f"{path}: {e}; {rebuild}") from None
