"""Crop decoders that decode only the part of a JPEG the crop needs.

FFCV 1.0.2 decodes every stored JPEG whole and then crops it. A random-resized crop covers about
half of the image on average, and libjpeg can skip the rows above the crop (no IDCT, no colour
conversion), stop after its last row, and leave out the columns outside it
(`native/jpeg_region.c`). The pixels of the region are exactly those of FFCV's full decode
(tested), so these decoders replace FFCV's `RandomResizedCropRGBImageDecoder` and
`CenterCropRGBImageDecoder`; raw-stored images take FFCV's path unchanged.

The random crop is FFCV's (same scale and aspect-ratio ranges, same ten attempts, same
fallback), except that its draws are `uniform(seed, epoch, sample, CROP_DRAWS + k)` (see
`transforms.py`) instead of numba's unseeded global generator, so a sample's crop is a function of
(seed, epoch, sample index) only.

The C file is compiled on first use with the system C compiler against libjpeg (Debian's
libjpeg-dev, which the OpenCV headers FFCV builds against pull in) into a per-user cache. Where
that fails, `region_decoders_available()` says why and the decoders decode JPEGs whole, as FFCV
does (same crops, same pixels, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numba
import numpy as np
from ffcv.fields.rgb_image import (IMAGE_MODES, CenterCropRGBImageDecoder,
                                   RandomResizedCropRGBImageDecoder, get_center_crop)
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler

from .transforms import CROP_DRAWS, AugmentKey, uniform

SOURCE = Path(__file__).resolve().parent / "native" / "jpeg_region.c"


def cache_dir() -> Path:
    """Where the compiled library goes: $SPIKESCALE_CACHE, else $XDG_CACHE_HOME/spikescale, else
    ~/.cache/spikescale."""
    if os.environ.get("SPIKESCALE_CACHE"):
        return Path(os.environ["SPIKESCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spikescale"


def build_library(out_dir: Path | None = None) -> Path:
    """Compile `native/jpeg_region.c` (once per source version; the name holds its hash).

    Raises `RuntimeError` with the compiler's message when it cannot be built. Several processes
    may build at once (ranks of one job): each writes its own temporary file and renames it.
    """
    source = SOURCE.read_bytes()
    out_dir = out_dir or cache_dir()
    target = out_dir / f"jpeg_region-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    fd, tmp = tempfile.mkstemp(prefix=target.name, dir=out_dir)
    os.close(fd)
    command = [compiler, "-O2", "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-ljpeg"]
    try:
        done = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise RuntimeError(f"cannot run the C compiler {compiler!r}: {e}") from None
    if done.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    os.replace(tmp, target)
    return target


@lru_cache(maxsize=None)
def _library() -> tuple[Callable | None, str]:
    """(the ctypes function, "") or (None, why not)."""
    try:
        lib = ctypes.CDLL(str(build_library()))
    except (RuntimeError, OSError) as e:
        return None, str(e)
    fn = lib.ss_decode_region
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int32,
                   ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    fn.restype = ctypes.c_int32
    return fn, ""


def region_decoders_available() -> tuple[bool, str]:
    """(True, "") when the region decoders can be used, else (False, the reason)."""
    fn, why = _library()
    return fn is not None, why


def decode_region_function() -> Callable:
    """`decode(jpeg, y0, x0, h, w, out, geometry) -> status` for Python or numba code: rows
    y0..y0+h-1 and at least columns x0..x0+w-1 as RGB rows of geometry[1] pixels in `out`,
    geometry[0] being the column of x0 (int32 geometry[2]). Status 0: decoded; -1: libjpeg
    cannot decode the data; -2: `out` too small; -3: the region is outside the image."""
    fn, why = _library()
    if fn is None:
        raise RuntimeError(f"region JPEG decoding unavailable: {why}")

    def decode(jpeg, y0, x0, h, w, out, geometry):
        return fn(jpeg.ctypes.data, jpeg.size, y0, x0, h, w, out.ctypes.data, out.size,
                  geometry.ctypes.data)

    return decode


def _refuse_region(jpeg, y0, x0, h, w, out, geometry):
    """`decode_region_function`'s stand-in without the native library: every request takes the
    whole-image decode."""
    return -1


@numba.njit(nogil=True)
def random_resized_crop(height, width, scale, ratio, seed, epoch, sample):
    """FFCV's `get_random_crop` with keyed draws: `(row, column, height, width)` of a crop of a
    `height` x `width` image whose area is a `scale` (float64 [min, max]) fraction of the image's
    and whose aspect ratio w/h is log-uniform in `ratio` (float64 [min, max]); ten attempts, then
    the centre crop of the clamped ratio. Compiled without fastmath, so the crop does not depend
    on how the decoder is compiled."""
    area = height * width
    log_ratio = np.log(ratio)
    for attempt in range(10):
        draw = CROP_DRAWS + 4 * attempt
        target_area = area * (scale[0] + (scale[1] - scale[0]) * uniform(seed, epoch, sample, draw))
        aspect_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0])
                              * uniform(seed, epoch, sample, draw + 1))
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(uniform(seed, epoch, sample, draw + 2) * (height - h + 1))
            j = int(uniform(seed, epoch, sample, draw + 3) * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio[0], ratio[1]):
        w = int(width)
        h = int(round(w / min(ratio[0], ratio[1])))
    elif in_ratio > max(ratio[0], ratio[1]):
        h = int(height)
        w = int(round(h * max(ratio[0], ratio[1])))
    else:
        w = int(width)
        h = int(height)
    return (int(height) - h) // 2, (int(width) - w) // 2, h, w


class _RegionDecodeMixin:
    """FFCV's `ResizedCropRGBImageDecoder.generate_code`, with the JPEG branch decoding only the
    crop's region (falling back to FFCV's whole-image decode if libjpeg refuses the region or the
    native library is unavailable), and the crop chosen by `crop_function()`:
    `crop(height, width, sample) -> (row, column, height, width)`."""

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        available, _ = region_decoders_available()
        decode_region_c = Compiler.compile(decode_region_function() if available
                                           else _refuse_region)
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        crop_c = Compiler.compile(self.crop_function())

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                sample = batch_indices[dst_ix]
                field = metadata[sample]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                i, j, h, w = crop_c(height, width, sample)
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    geometry = np.zeros(2, np.int32)
                    if decode_region_c(image_data, i, j, h, w, temp_buffer, geometry) == 0:
                        row = geometry[1]
                        region = temp_buffer.reshape(-1)[:h * row * 3].reshape(h, row, 3)
                        resize_crop_c(region, 0, h, geometry[0], geometry[0] + w,
                                      destination[dst_ix])
                    else:
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0,
                                   1, 1, False, False)
                        whole = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                        resize_crop_c(whole, i, i + h, j, j + w, destination[dst_ix])
                else:
                    whole = image_data.reshape(height, width, 3)
                    resize_crop_c(whole, i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class RandomResizedCropRegionDecoder(_RegionDecodeMixin, RandomResizedCropRGBImageDecoder):
    """`RandomResizedCropRGBImageDecoder` that decodes only the crop of each JPEG and draws the
    crop of sample s from `uniform(seed, epoch, s, ...)`, (seed, epoch) read from `key`."""

    def __init__(self, output_size: tuple[int, int], key: AugmentKey,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (0.75, 4 / 3)):
        super().__init__(output_size, scale=scale, ratio=ratio)
        self.key = key

    def crop_function(self) -> Callable:
        scale, ratio = np.array(self.scale, np.float64), np.array(self.ratio, np.float64)
        read_key = self.key.reader()

        def crop(height, width, sample):
            seed, epoch = read_key()
            return random_resized_crop(height, width, scale, ratio, seed, epoch, sample)

        return crop


class CenterCropRegionDecoder(_RegionDecodeMixin, CenterCropRGBImageDecoder):
    """`CenterCropRGBImageDecoder` that decodes only the crop of each JPEG."""

    def crop_function(self) -> Callable:
        centre_crop = Compiler.compile(get_center_crop)
        ratio = self.ratio

        def crop(height, width, sample):
            return centre_crop(height, width, ratio, ratio)  # its third argument is unused

        return crop


def crop_decoders() -> tuple[type, type]:
    """(random-resized-crop decoder class, centre-crop decoder class); when the native library
    does not build they decode JPEGs whole, and one warning says why."""
    available, why = region_decoders_available()
    if not available:
        _warn_once(why)
    return RandomResizedCropRegionDecoder, CenterCropRegionDecoder


@lru_cache(maxsize=None)
def _warn_once(why: str) -> None:
    warnings.warn(f"JPEG crops are decoded whole (FFCV's decoder), slower: {why}", stacklevel=3)
