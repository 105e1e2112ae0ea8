"""FFCV pipeline stages that FFCV 1.0.2 lacks or does slowly.

`NormalizeToFloat` and `EventFramesToFloat` are written in torch so they run on CPU or GPU
(FFCV's own `NormalizeImage` needs cupy on the GPU, and it has nothing for event frames); they
write into buffers FFCV allocates per batch slot, so FFCV's stream/event bookkeeping (which keeps
a slot alive until the consumer is done with it) covers them. `RandomHorizontalFlipInPlace` is
compiled by numba into FFCV's parallel decode stage, like FFCV's own image operations.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class RandomHorizontalFlipInPlace(Operation):
    """Mirror each `[H, W, C]` uint8 image of the batch left-right with probability `flip_prob`,
    in place.

    Same result as FFCV's `RandomHorizontalFlip`, which copies every image of the batch into a
    new buffer through a negative-stride slice: on one core that copy cost about as much as the
    random-resized-crop's resize (0.15 ms per 224 px image, `benchmarks/loader.py`). Here only
    the chosen images are touched, by swapping pixels across the middle column.
    """

    def __init__(self, flip_prob: float = 0.5):
        super().__init__()
        self.flip_prob = flip_prob

    def declare_state_and_memory(self, previous_state: State
                                 ) -> Tuple[State, Optional[AllocationQuery]]:
        return replace(previous_state, jit_mode=True), None

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        flip_prob = self.flip_prob

        def flip(images, _):
            chosen = np.random.rand(images.shape[0]) < flip_prob
            height, width, channels = images.shape[1], images.shape[2], images.shape[3]
            for i in my_range(images.shape[0]):
                if chosen[i]:
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
        return flip


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
    in x and y (vacated pixels are 0, i.e. no events).

    The augmentation draws from its own generator, seeded once from `seed`, so it neither reads
    nor advances the trainer's torch RNG (this runs in FFCV's loader thread).
    """

    def __init__(self, flip: bool, translate: int, seed: int):
        super().__init__()
        self.flip = flip
        self.translate = translate
        self.generator = torch.Generator().manual_seed(seed)

    def declare_state_and_memory(self, previous_state: State
                                 ) -> Tuple[State, Optional[AllocationQuery]]:
        self._frame_shape = tuple(previous_state.shape)  # (T, 2, H, W)
        numel = 1
        for s in self._frame_shape:
            numel *= s
        # Flat per-sample buffer: the first B rows of the slot are B*T*2*H*W contiguous floats,
        # which we view time-major.
        return (replace(previous_state, jit_mode=False, dtype=torch.float32),
                AllocationQuery((numel,), torch.float32, previous_state.device))

    def generate_code(self) -> Callable:
        steps, polarities, height, width = self._frame_shape
        flip, pad, gen = self.flip, self.translate, self.generator

        def to_time_major(frames: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
            batch = frames.shape[0]
            out = dst[:batch].view(steps, batch, polarities, height, width)
            out.copy_(frames.transpose(0, 1))
            if flip:
                flipped = (torch.rand(batch, generator=gen) < 0.5).nonzero().flatten()
                if len(flipped):
                    idx = flipped.to(out.device)
                    out[:, idx] = out[:, idx].flip(-1)
            if pad:
                shifts = torch.randint(-pad, pad + 1, (batch, 2), generator=gen).tolist()
                for b, (dy, dx) in enumerate(shifts):
                    if dy or dx:
                        out[:, b] = shift_frames(out[:, b], dy, dx)
            return out

        return to_time_major


def shift_frames(frames: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift `[..., H, W]` by `dy` rows down and `dx` columns right, filling with zeros."""
    height, width = frames.shape[-2:]
    shifted = torch.zeros_like(frames)
    if abs(dy) >= height or abs(dx) >= width:
        return shifted
    shifted[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        frames[..., max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return shifted
