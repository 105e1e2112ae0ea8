"""Activation checkpointing modes of the spiking ResNets, and spikes stored at 1 bit each.

``none``         every activation is kept for backward.
``blocks``       each residual block keeps only its input and is recomputed in backward.
``blocks+time``  as ``blocks``, and
                 - the block inputs, which are spikes (the block before ends in a LIF), are kept
                   bit-packed: 1 bit per spike instead of 16 or 32;
                 - every LIF runs its T loop in checkpointed chunks of ``time_chunk`` steps, the
                   membrane carried across chunk boundaries, so a neuron under recomputation
                   holds one chunk's intermediates instead of T steps' worth (the reference
                   loop; a fused kernel keeps only its input and chunk states anyway);
                 - the stem LIF, outside any block, is recomputed too, so that its chunk states
                   are not kept: for direct encoding it keeps only the stem output, once.
                 What a forward pass leaves for backward then grows with T only by the packed
                 block inputs, 1 bit per spike per step (plus the head's [T, B, C] vectors).

All three give the same gradients (the recomputation repeats the same arithmetic, and packing is
lossless for 0/1 values). What still grows with T is the peak while one block is recomputed in
backward: tdBN normalises over T x B x H x W, so its statistics and the convolutions it follows
see all T steps at once, and the block holds them for all T (chunking the block over time would
change tdBN's statistics, or cost one more recomputation pass per tdBN to stay exact).

A network holds its mode in ``model.checkpointing`` (``set_checkpointing_mode``) and runs each
of its parts through ``checkpointed``, which applies the mode to that part.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from functools import lru_cache, partial
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from models.names import CHECKPOINTING_MODES, OUTPUTS
from models.neuron_context import recomputation
from models.neurons import LIF, neuron_context

__all__ = ["CHECKPOINTING_MODES", "OUTPUTS", "PackedSpikes", "pack_spikes", "unpack_spikes", "spikes_saved_packed",
           "set_checkpointing_mode", "compile_parts", "checkpoint_contexts", "checkpointed"]


@lru_cache(maxsize=None)
def _bit_weights(device: torch.device) -> Tensor:
    """1, 2, 4, ..., 128 as uint8 on ``device`` (made once per device, not per pack)."""
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


class PackedSpikes:
    """A 0/1 tensor stored as bits: ``bits`` holds ceil(numel / 8) bytes."""

    __slots__ = ("bits", "shape", "dtype")

    def __init__(self, bits: Tensor, shape: torch.Size, dtype: torch.dtype):
        self.bits, self.shape, self.dtype = bits, shape, dtype

    @property
    def nbytes(self) -> int:
        return self.bits.numel()


def pack_spikes(spikes: Tensor) -> PackedSpikes:
    """Spikes (any float dtype, values exactly 0 or 1, any layout) -> 1 bit each."""
    flat = spikes.detach().reshape(-1) != 0
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = (flat.view(-1, 8).to(torch.uint8) * _bit_weights(flat.device)).sum(1, dtype=torch.uint8)
    return PackedSpikes(bits, spikes.shape, spikes.dtype)


def unpack_spikes(packed: PackedSpikes) -> Tensor:
    """The 0/1 tensor back, contiguous, in its original dtype and shape."""
    flat = (packed.bits.unsqueeze(1) & _bit_weights(packed.bits.device)).ne(0).reshape(-1)
    return flat[: packed.shape.numel()].to(packed.dtype).view(packed.shape)


@contextmanager
def spikes_saved_packed(spikes: Tensor) -> Iterator[None]:
    """While active, autograd (and a non-reentrant checkpoint saving its inputs) stores the
    tensor ``spikes`` bit-packed; every other saved tensor is kept as is.

    The caller vouches that ``spikes`` holds only 0 and 1 (a LIF layer's output)."""

    def pack(t: Tensor) -> Any:
        # The checkpoint hands its input tensor itself to the hook.
        return pack_spikes(t) if t is spikes else t

    def unpack(saved: Any) -> Tensor:
        return unpack_spikes(saved) if isinstance(saved, PackedSpikes) else saved

    with saved_tensors_hooks(pack, unpack):
        yield


def set_checkpointing_mode(model: nn.Module, mode: str, time_chunk: int) -> None:
    """Check and apply a checkpointing mode: ``model.checkpointing``, which ``checkpointed``
    reads, becomes ``mode``, and every LIF of ``model`` runs its time loop in chunks of
    ``time_chunk`` steps under ``blocks+time``."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING_MODES)}; got {mode!r}")
    if time_chunk < 1:
        raise ValueError(f"time_chunk must be >= 1, got {time_chunk}")
    if mode != "none" and model._compiled_call_impl is not None:
        raise ValueError(f"checkpointing {mode!r} after the whole model was compiled: inside one compiled "
                         "graph a recomputed part would update its BatchNorm statistics and firing "
                         "counts twice; set the checkpointing mode first, then call compile()")
    model.checkpointing = mode
    neuron_context(model).time_chunk = time_chunk if mode == "blocks+time" else None


def compile_parts(parts: Sequence[nn.Module], *args: Any, **kwargs: Any) -> None:
    """torch.compile each checkpointed part on its own (static shapes), in place.

    Dynamo keeps at most ``recompile_limit`` graphs per code object, and every part of a class
    shares one: a graph per part shape, in training and in evaluation, per batch size (a last,
    smaller batch) must fit, or a part would fall back to eager midway."""
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # its older name
    setattr(config, limit, max(getattr(config, limit), 8 * len(parts)))
    kwargs.setdefault("dynamic", False)
    for part in parts:
        part.compile(*args, **kwargs)


@contextmanager
def _no_side_effects(block: nn.Module) -> Iterator[None]:
    """While a checkpointed block is recomputed in backward, keep its BatchNorm running
    statistics and what its neurons report (firing counts, spike totals: ``recomputation``
    switches every neuron's reporting off in one place) from being updated a second time.

    The recomputation runs exactly as the forward pass did (a compiled block runs the same
    graph; no attribute it is specialised on changes): what BatchNorm adds is taken back after,
    and the neurons' reporting runs outside compiled graphs, where the switch is read."""
    bns = [m for m in block.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    with torch.no_grad():
        saved_bn = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                    for m in bns]
    try:
        with recomputation():
            yield
    finally:
        with torch.no_grad():
            for bn, mean, var, tracked in saved_bn:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)


def checkpoint_contexts(block: nn.Module):
    """``context_fn`` of ``torch.utils.checkpoint``: the recomputation leaves no side effects."""
    return nullcontext(), _no_side_effects(block)


def checkpointed(model: nn.Module, part: nn.Module, x: Tensor, *args: Any, spikes: bool = False) -> Tensor:
    """``part(x, *args)`` for a part of ``model``, recomputed in backward as ``model.checkpointing``
    says; only in training with gradients on.

    A residual block or a hidden layer is recomputed under ``blocks`` and ``blocks+time``. A LIF
    outside any block (a stem's, a last one) only under ``blocks+time``: run in time chunks on its
    own it would keep one membrane state per chunk for backward; recomputed, it keeps only its
    input (for direct encoding, the stem output broadcast over T). With ``spikes`` the caller
    vouches that ``x`` holds only 0 and 1 (a LIF's output), and under ``blocks+time`` it is kept
    at 1 bit each. BatchNorm statistics and firing counts are not updated by a recomputation."""
    mode = model.checkpointing
    if (mode == "none" or not (model.training and torch.is_grad_enabled())
            or (isinstance(part, LIF) and mode != "blocks+time")):
        return part(x, *args)
    with spikes_saved_packed(x) if spikes and mode == "blocks+time" else nullcontext():
        return checkpoint(part, x, *args, use_reentrant=False, context_fn=partial(checkpoint_contexts, part))
