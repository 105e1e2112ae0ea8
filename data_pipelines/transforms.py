"""FFCV pipeline stages that FFCV 1.0.2 lacks, does slowly, or cannot seed.

`NormalizeToFloat` and `EventFramesToFloat` are written in torch so they run on CPU or GPU
(FFCV's own `NormalizeImage` needs cupy on the GPU, and it has nothing for event frames); they
write into buffers FFCV allocates per batch slot, so FFCV's stream/event bookkeeping (which keeps
a slot alive until the consumer is done with it) covers them. `RandomHorizontalFlipInPlace` and
`RandomTranslateInPlace` are compiled by numba into FFCV's parallel decode stage, like FFCV's own
image operations.

Every random draw of a stage is `uniform(seed, epoch, sample, draw)`: a counter-based hash of the
run's seed, the epoch, the sample's index in the data set and the draw's number (DESIGN.md,
decision 10). FFCV's stages draw from numba's global generator in the loader thread, which
nothing seeds or saves; these draw the same augmentation for a sample whatever rank, batch size,
number of threads or resumed batch reads it. FFCV hands each stage the data-set indices of its
batch (`with_indices`); the (seed, epoch) pair reaches the compiled code through an `AugmentKey`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence, Tuple

import numba
import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import types
from numba.extending import intrinsic

#: Draw numbers of a sample's augmentations: one per random quantity, so that no two share a draw.
FLIP_DRAW = 0
SHIFT_DRAWS = 1  # row offset, then column offset
CROP_DRAWS = 3   # 4 per attempt of the random-resized crop: area, log aspect ratio, row, column

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@numba.njit(nogil=True)
def _mix(z):
    """splitmix64's finaliser: a bijection of uint64 whose every output bit depends on every
    input bit."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True)
def uniform(seed, epoch, sample, draw):
    """A float in [0, 1) that is a pure function of (seed, epoch, sample, draw), all
    non-negative integers: splitmix64 absorbing one word at a time, top 53 bits as the
    mantissa. Compiled without fastmath, so the value does not depend on how the caller is
    compiled (FFCV's stages are fastmath, parallel or not with the thread count)."""
    h = _mix(np.uint64(seed) + _GOLDEN)
    h = _mix(h + np.uint64(epoch) + _GOLDEN)
    h = _mix(h + np.uint64(sample) + _GOLDEN)
    h = _mix(h + np.uint64(draw) + _GOLDEN)
    return np.float64(h >> np.uint64(11)) * _TO_UNIT


@numba.njit(nogil=True)
def uniforms(seed, epoch, samples, draw):
    """`uniform` for each index of the int array `samples`: float64 `[len(samples)]`."""
    out = np.empty(len(samples))
    for i in range(len(samples)):
        out[i] = uniform(seed, epoch, samples[i], draw)
    return out


@intrinsic
def _uint64_pointer(typingctx, address):
    """The integer `address` as a `uint64*` (numba has no cast from integer to pointer)."""
    if not isinstance(address, types.Integer):
        return None
    signature = types.CPointer(types.uint64)(address)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


class AugmentKey:
    """The (seed, epoch) that a loader's seeded stages read while they run.

    FFCV compiles a loader's stages once and reuses them every epoch, and numba freezes the arrays
    a compiled function closes over into constants. So the pair lives in a small array that the
    compiled code reads through its address on every batch (`reader`), and that the loader sets
    before each epoch (`set`). Whoever holds the stages holds this object, which keeps the array
    alive as long as the compiled code can read it.
    """

    def __init__(self):
        self.values = np.zeros(2, np.uint64)

    def set(self, seed: int, epoch: int) -> None:
        """Key the next epoch's draws: `seed` any int (taken modulo 2**64), `epoch` >= 0."""
        self.values[:] = (seed % 2**64, epoch)

    def reader(self) -> Callable[[], tuple]:
        """A compiled `read() -> (seed, epoch)` (uint64s) that sees every later `set`."""
        address = self.values.ctypes.data

        @numba.njit(nogil=True)
        def read():
            values = numba.carray(_uint64_pointer(address), 2)
            return values[0], values[1]

        return read


class RandomHorizontalFlipInPlace(Operation):
    """Mirror each `[H, W, C]` uint8 image of the batch left-right with probability `flip_prob`,
    in place; sample s is mirrored when `uniform(seed, epoch, s, FLIP_DRAW) < flip_prob`, with
    (seed, epoch) read from `key`.

    Same result as FFCV's `RandomHorizontalFlip`, which copies every image of the batch into a
    new buffer through a negative-stride slice: on one core that copy cost about as much as the
    random-resized-crop's resize (0.15 ms per 224 px image, `benchmarks/loader.py`). Here only
    the chosen images are touched, by swapping pixels across the middle column.
    """

    def __init__(self, key: AugmentKey, flip_prob: float = 0.5):
        super().__init__()
        self.key = key
        self.flip_prob = flip_prob

    def declare_state_and_memory(self, previous_state: State
                                 ) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), None

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        flip_prob = self.flip_prob
        read_key = self.key.reader()

        def flip(images, _, samples):
            seed, epoch = read_key()
            height, width, channels = images.shape[1], images.shape[2], images.shape[3]
            for i in my_range(images.shape[0]):
                if uniform(seed, epoch, samples[i], FLIP_DRAW) < flip_prob:
                    image = images[i]
                    for y in range(height):
                        for x in range(width // 2):
                            mirror = width - 1 - x
                            for c in range(channels):
                                pixel = image[y, x, c]
                                image[y, x, c] = image[y, mirror, c]
                                image[y, mirror, c] = pixel
            return images

        flip.is_parallel = True
        flip.with_indices = True  # FFCV passes the batch's data-set indices as `samples`
        return flip


class RandomTranslateInPlace(Operation):
    """Shift each `[H, W, C]` uint8 image of the batch by up to `padding` px in each direction,
    in place, filling the vacated pixels with 0: the image is placed in a zero canvas padded by
    `padding` and the output is the canvas window at row `int(u * (2 * padding + 1))`, column
    likewise, u = `uniform(seed, epoch, s, SHIFT_DRAWS)` then `SHIFT_DRAWS + 1` for sample s.

    FFCV's `RandomTranslate` (zero fill), with the offsets keyed instead of drawn from numba's
    global generator.
    """

    def __init__(self, key: AugmentKey, padding: int):
        super().__init__()
        self.key = key
        self.padding = padding

    def declare_state_and_memory(self, previous_state: State
                                 ) -> Tuple[State, Optional[AllocationQuery]]:
        height, width, channels = previous_state.shape
        canvas = (height + 2 * self.padding, width + 2 * self.padding, channels)
        return (replace(previous_state, jit_mode=True),
                AllocationQuery(canvas, previous_state.dtype))

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad = self.padding
        span = 2 * pad + 1
        read_key = self.key.reader()

        def translate(images, canvases, samples):
            seed, epoch = read_key()
            height, width = images.shape[1], images.shape[2]
            for i in my_range(images.shape[0]):
                y = int(uniform(seed, epoch, samples[i], SHIFT_DRAWS) * span)
                x = int(uniform(seed, epoch, samples[i], SHIFT_DRAWS + 1) * span)
                canvas = canvases[i]
                canvas[:] = 0
                canvas[pad:pad + height, pad:pad + width] = images[i]
                images[i] = canvas[y:y + height, x:x + width]
            return images

        translate.is_parallel = True
        translate.with_indices = True
        return translate


class NormalizeToFloat(Operation):
    """uint8 samples -> float32 `(x - mean) / std`, on the samples' device.

    Images `[B, C, H, W]`: `mean`/`std` are per channel, in the stored pixel units (0..255 for
    RGB, 0..16 for the digits). With `channels_last` the result has channels-last strides (what
    cuDNN convs prefer); otherwise it is contiguous.

    Sequences `[B, T, ...]` with `time_major`: `mean`/`std` are one value each for every
    element, and the result is contiguous `[T, B, ...]` (time leads inside the network).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool,
                 time_major: bool = False):
        super().__init__()
        if time_major and (channels_last or len(mean) != 1 or len(std) != 1):
            raise ValueError(f"time_major normalisation takes one mean and one std and no "
                             f"channels_last; got {len(mean)} means, {len(std)} stds, "
                             f"channels_last={channels_last}")
        self.mean = list(mean)
        self.std = list(std)
        self.channels_last = channels_last
        self.time_major = time_major

    def declare_state_and_memory(self, previous_state: State
                                 ) -> Tuple[State, Optional[AllocationQuery]]:
        device = previous_state.device
        if self.time_major:
            self._sample_shape = tuple(previous_state.shape)  # (T, ...)
            stats = (1,) * (len(self._sample_shape) + 1)  # broadcasts over [T, B, ...]
            # Flat per-sample buffer: its first B rows are B*T*... contiguous floats, which
            # `generate_code` views time-major.
            shape: Tuple[int, ...] = (int(np.prod(self._sample_shape)),)
        else:
            channels, height, width = previous_state.shape
            if len(self.mean) != channels:
                raise ValueError(f"{len(self.mean)} normalisation means for {channels} channels")
            stats = (1, channels, 1, 1)
            shape = (height, width, channels) if self.channels_last else (channels, height, width)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32, device=device).view(stats)
        self._std_t = torch.tensor(self.std, dtype=torch.float32, device=device).view(stats)
        return (replace(previous_state, jit_mode=False, dtype=torch.float32),
                AllocationQuery(shape, torch.float32, device))

    def generate_code(self) -> Callable:
        mean, std, channels_last = self._mean_t, self._std_t, self.channels_last
        time_major = self.time_major
        sample_shape = self._sample_shape if time_major else ()

        def normalize(samples: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            batch = samples.shape[0]
            out = dst[:batch]
            if time_major:
                out = out.view(sample_shape[0], batch, *sample_shape[1:])
                samples = samples.transpose(0, 1)
            elif channels_last:
                out = out.permute(0, 3, 1, 2)
            torch.sub(samples, mean, out=out)
            return out.div_(std)

        return normalize


class EventFramesToFloat(Operation):
    """Event-count frames `[B, T, 2, H, W]` (int16) -> float32 `[T, B, 2, H, W]`, with optional
    random horizontal flip (probability 1/2) and random translation by up to `translate` pixels
    in x and y (vacated pixels are 0, i.e. no events); a sample is flipped first, then shifted.

    Sample s is flipped when `uniform(seed, epoch, s, FLIP_DRAW) < 0.5` and shifted by
    `int(u * (2 * translate + 1)) - translate` rows down (u = draw `SHIFT_DRAWS`) and columns
    right (draw `SHIFT_DRAWS + 1`), (seed, epoch) read from `key`: the trainer's torch RNG is
    neither read nor advanced (this runs in FFCV's loader thread).
    """

    def __init__(self, flip: bool, translate: int, key: AugmentKey):
        super().__init__()
        self.flip = flip
        self.translate = translate
        self.key = key

    def declare_state_and_memory(self, previous_state: State
                                 ) -> Tuple[State, Optional[AllocationQuery]]:
        self._frame_shape = tuple(int(n) for n in previous_state.shape)  # (T, 2, H, W)
        numel = 1
        for s in self._frame_shape:
            numel *= s
        # Flat per-sample buffer: the first B rows of the slot are B*T*2*H*W contiguous floats,
        # which we view time-major.
        return (replace(previous_state, jit_mode=False, dtype=torch.float32),
                AllocationQuery((numel,), torch.float32, previous_state.device))

    def generate_code(self) -> Callable:
        steps, polarities, height, width = self._frame_shape
        flip, pad, key = self.flip, self.translate, self.key

        def to_time_major(frames: torch.Tensor, dst: torch.Tensor,
                          samples: np.ndarray) -> torch.Tensor:
            batch = frames.shape[0]
            out = dst[:batch].view(steps, batch, polarities, height, width)
            if not pad:
                out.copy_(frames.transpose(0, 1))
            if not (flip or pad):
                return out
            seed, epoch = key.values
            mirrored = (uniforms(seed, epoch, samples, FLIP_DRAW) < 0.5 if flip
                        else np.zeros(batch, bool))
            if pad:
                span = 2 * pad + 1
                dy = (uniforms(seed, epoch, samples, SHIFT_DRAWS) * span).astype(np.int64) - pad
                dx = (uniforms(seed, epoch, samples, SHIFT_DRAWS + 1) * span).astype(np.int64) - pad
                # Shifting by -dx and then flipping is flipping and then shifting by dx.
                dx = np.where(mirrored, -dx, dx)
                # One rectangle copy per sample: on the CPU 3-4x faster than any gather of the
                # whole batch (torch's int16 padding, gather and advanced indexing are slow there).
                out.zero_()
                for b, (y, x) in enumerate(zip(dy.tolist(), dx.tolist())):
                    if abs(y) < height and abs(x) < width:  # else all events leave the frame
                        (to_y, from_y), (to_x, from_x) = _overlap(y, height), _overlap(x, width)
                        out[:, b, :, to_y, to_x] = frames[b, :, :, from_y, from_x]
            chosen = torch.from_numpy(np.flatnonzero(mirrored)).to(frames.device)
            if len(chosen):
                out[:, chosen] = out[:, chosen].flip(-1)
            return out

        to_time_major.with_indices = True
        return to_time_major


def _overlap(shift: int, size: int) -> tuple[slice, slice]:
    """(destination, source) slices of an axis of `size` px shifted by `shift` px
    (|shift| < size): what stays in the frame."""
    return (slice(max(shift, 0), size + min(shift, 0)),
            slice(max(-shift, 0), size + min(-shift, 0)))
