"""Fused Triton kernels for the LIF neuron op: forward and backward are each one kernel with the
loop over time inside.

The dynamics are those of ``models.neurons`` (its module docstring and ``_lif_reference`` are the
specification): ``h = d * v + x (+ w * o_prev)``, ``o = H(h - V_th)``, hard / soft / no reset,
every surrogate of ``models.surrogates``, recurrence ``none`` or ``self``, ``detach_reset``,
every leak (normal, none, complete: the decay is a value, 1 or 0), scalar or per-channel
(learnable) decay and threshold, an initial state in and the final state out. ``lateral`` and
``full`` recurrence mix neurons through a matrix or a convolution and stay with the reference
(``declines`` says so, logged once by the dispatch). The forward does the reference's fp32
operations in the reference's order, with fused multiply-adds turned off, so spikes and
membrane are bit-identical to the reference's.

Memory traffic and what backward keeps
--------------------------------------
Forward reads ``x [T, N]`` (N neurons per step) and writes the spikes ``[T, N]`` in x's dtype;
the membrane stays in fp32 registers. Backward reads x, ``grad_spikes`` and writes ``grad_x``:
it recomputes the membrane from x instead of loading a saved trajectory. Each program replays a
chunk of up to ``MAX_CHUNK`` steps forward, keeping every step's fp32 charge ``h`` in registers,
and walks the chunk in reverse. Autograd therefore keeps:

- ``x`` itself (no copy: 2 bytes per neuron-step in bf16/fp16, 4 in fp32);
- for ``T <= MAX_CHUNK`` nothing else; for longer sequences the fp32 membrane entering each
  chunk after the first (and the fp32 spike with ``self`` recurrence), written by the forward:
  4 (8) bytes per neuron per chunk of ``ceil(T / ceil(T / MAX_CHUNK))`` steps;
- the per-channel parameters and the initial state when given.

Spikes are not saved (backward recomputes them), so nothing is bit-packed. Forward + backward
move five ``[T, N]`` tensors (x, spikes, x again, grad_spikes, grad_x), plus, when the final
state is asked for, one fp32 ``[N]`` write each for membrane and spike.

Layouts
-------
The kernels index memory in the order it is laid out: an input whose time axis is outermost and
whose steps ``x[t]`` are dense (contiguous NCHW, channels-last NHWC, ...) runs in place and the
spikes and ``grad_x`` come back with its strides; any other input is made contiguous first. A
neuron's channel follows from the channel stride ``sc = x.stride(2)``: with ``sc == 1``
(channels-last, ``[T, B, C]``) a step is ``[M, C]`` rows of channels, otherwise ``[M, sc]``
rows that each lie in channel ``row % C``. Per-channel parameter gradients are summed over the
non-channel axis of each program's tile, and the per-program partial sums by ``torch.sum``.

Entry points: ``lif_triton`` (the ``NeuronImplFn`` of ``models.neurons``, plus
``return_state``), registered at the bottom as the ``"triton"`` neuron implementation for CUDA
tensors, and the custom ops ``torch.ops.spikescale.lif_forward`` / ``lif_backward`` behind it:
fake implementations and an autograd formula, so ``torch.compile`` traces through them, and no
autocast rule, so under autocast the op runs in the dtype its input arrives in (fp32 state
regardless). Under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter, set before this module is
imported) the implementation also accepts CPU tensors; that is how the CPU tests run the kernels.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from models.dispatch import LIFSpec, LIFState, register_neuron_impl
from models.neuron_config import Recurrence, Reset, Surrogate

__all__ = ["lif_triton", "accepts", "declines", "SUPPORTED_DTYPES", "INTERPRET"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Read once, like Triton reads it when the kernels below are decorated: interpreted kernels run
# on the host and take CPU tensors (tests); compiled ones need CUDA tensors.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_RESET_CODE = {Reset.hard: 0, Reset.soft: 1, Reset.none: 2}
_SURROGATE_CODE = {Surrogate.rectangular: 0, Surrogate.sigmoid: 1, Surrogate.atan: 2, Surrogate.triangle: 3}

# Tiling, the starting point for tuning on the GPU. Forward: FWD_BLOCK neurons per program and a
# plain loop over time. Backward: CHUNK x (neurons per thread) fp32 charges live in registers,
# so the block shrinks as the chunk grows; ptxas (sm_90, bf16, no learnable parameters) gives
# 48 registers for 4 steps x 4 neurons per thread and 92 for 16 x 2, without spills, and at
# most 112 over every variant the tests launch.
FWD_BLOCK = 1024
NUM_WARPS = 4
MAX_CHUNK = 16
MAX_REPLAY_VALUES = 32  # chunk steps x neurons per thread held in registers by the backward


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _reset(h, fire, v_threshold, v_reset, RESET: tl.constexpr):
    """Membrane after the spike decision (the reference's three reset modes)."""
    if RESET == 0:  # hard: h * (1 - o) + v_reset * o
        v = tl.where(fire, v_reset, h)
    elif RESET == 1:  # soft: h - V_th * o
        v = tl.where(fire, h - v_threshold, h)
    else:
        v = h
    return v


@triton.jit
def _step(x, v, o, d, v_threshold, w, v_reset, RESET: tl.constexpr, SELF_REC: tl.constexpr):
    """One time step in fp32, the reference's operations in its order: (h, spike, v)."""
    h = d * v + x
    if SELF_REC:
        h = h + w * o
    fire = (h - v_threshold) > 0
    return h, fire.to(tl.float32), _reset(h, fire, v_threshold, v_reset, RESET)


@triton.jit
def _surrogate_grad(z, s1, s2, SURROGATE: tl.constexpr):
    """dH/dz of the surrogate; (s1, s2) are constants the host derives from the width."""
    if SURROGATE == 0:  # rectangular: (|z| < a/2) / a; s1 = a/2, s2 = 1/a
        g = tl.where(tl.abs(z) < s1, s2, 0.0)
    elif SURROGATE == 1:  # sigmoid: alpha * s * (1 - s), s = sigmoid(alpha z); s1 = alpha
        s = tl.sigmoid(s1 * z)
        g = s1 * s * (1.0 - s)
    elif SURROGATE == 2:  # atan: (alpha/2) / (1 + (pi/2 alpha z)^2); s1 = pi/2 alpha, s2 = alpha/2
        u = s1 * z
        g = s2 / (1.0 + u * u)
    else:  # triangle: max(0, gamma - |z|) / gamma^2; s1 = gamma, s2 = 1/gamma^2
        g = tl.maximum(s1 - tl.abs(z), 0.0) * s2
    return g


@triton.jit
def _tile(M, K, C, BM: tl.constexpr, BK: tl.constexpr, CH_INNER: tl.constexpr):
    """This program's [BM, BK] tile of one step: offsets, mask, row and column indices, and the
    channel of each element with its mask."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    rm = (pid // num_k) * BM + tl.arange(0, BM)
    rk = (pid % num_k) * BK + tl.arange(0, BK)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    offs = rm[:, None] * K + rk[None, :]
    if CH_INNER:  # rows of channels: column k is channel k
        chan = rk[None, :]
        chan_mask = (rk < K)[None, :]
    else:  # each row lies in one channel
        chan = (rm % C)[:, None]
        chan_mask = (rm < M)[:, None]
    return offs, mask, rm, rk, chan, chan_mask


@triton.jit
def _param(ptr, value, chan, chan_mask, PER_CHANNEL: tl.constexpr):
    if PER_CHANNEL:
        p = tl.load(ptr + chan, mask=chan_mask, other=0.0).to(tl.float32)
    else:
        p = value
    return p


@triton.jit
def _lif_fwd_kernel(
    x_ptr, spike_ptr, chunk_state_ptr, v_init_ptr, o_init_ptr, v_last_ptr, o_last_ptr,
    decay_ptr, threshold_ptr, weight_ptr,
    decay_value, threshold_value, v_reset,
    T, N, M, K, C, STATE_STRIDE,
    BM: tl.constexpr, BK: tl.constexpr, CH_INNER: tl.constexpr, CHUNK: tl.constexpr,
    RESET: tl.constexpr, SELF_REC: tl.constexpr, DECAY_PC: tl.constexpr, THRESHOLD_PC: tl.constexpr,
    HAS_INIT: tl.constexpr, SAVE_CHUNK_STATES: tl.constexpr, WRITE_STATE: tl.constexpr,
):
    offs, mask, rm, rk, chan, chan_mask = _tile(M, K, C, BM, BK, CH_INNER)
    d = _param(decay_ptr, decay_value, chan, chan_mask, DECAY_PC)
    v_th = _param(threshold_ptr, threshold_value, chan, chan_mask, THRESHOLD_PC)
    w = 0.0
    if SELF_REC:
        w = tl.load(weight_ptr + chan, mask=chan_mask, other=0.0).to(tl.float32)
    if HAS_INIT:
        v = tl.load(v_init_ptr + offs, mask=mask, other=0.0)
        o = tl.load(o_init_ptr + offs, mask=mask, other=0.0)
    else:
        v = tl.zeros([BM, BK], dtype=tl.float32)
        o = tl.zeros([BM, BK], dtype=tl.float32)
    for t in range(T):
        if SAVE_CHUNK_STATES:  # the state entering each chunk after the first, for the backward
            at_start = (t % CHUNK == 0) & (t > 0)
            slot = (t // CHUNK - 1) * STATE_STRIDE
            tl.store(chunk_state_ptr + slot + offs, v, mask=mask & at_start)
            if SELF_REC:
                tl.store(chunk_state_ptr + slot + N + offs, o, mask=mask & at_start)
        x = tl.load(x_ptr + t * N + offs, mask=mask, other=0.0).to(tl.float32)
        h, o, v = _step(x, v, o, d, v_th, w, v_reset, RESET, SELF_REC)
        tl.store(spike_ptr + t * N + offs, o.to(spike_ptr.dtype.element_ty), mask=mask)
    if WRITE_STATE:
        tl.store(v_last_ptr + offs, v, mask=mask)
        tl.store(o_last_ptr + offs, o, mask=mask)


@triton.jit
def _lif_bwd_kernel(
    x_ptr, grad_spike_ptr, grad_x_ptr, chunk_state_ptr, v_init_ptr, o_init_ptr,
    grad_v_last_ptr, grad_o_last_ptr, grad_v_init_ptr, grad_o_init_ptr,
    decay_ptr, threshold_ptr, weight_ptr, grad_decay_ptr, grad_threshold_ptr, grad_weight_ptr,
    decay_value, threshold_value, v_reset, s1, s2,
    T, N, M, K, C, STATE_STRIDE, NUM_CHUNKS,
    BM: tl.constexpr, BK: tl.constexpr, CH_INNER: tl.constexpr, CHUNK: tl.constexpr,
    EVEN_T: tl.constexpr, RESET: tl.constexpr, SELF_REC: tl.constexpr, DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, DECAY_PC: tl.constexpr, THRESHOLD_PC: tl.constexpr,
    HAS_INIT: tl.constexpr, HAS_GRAD_LAST: tl.constexpr,
    NEED_DECAY: tl.constexpr, NEED_THRESHOLD: tl.constexpr, NEED_WEIGHT: tl.constexpr,
    NEED_INIT: tl.constexpr,
):
    offs, mask, rm, rk, chan, chan_mask = _tile(M, K, C, BM, BK, CH_INNER)
    d = _param(decay_ptr, decay_value, chan, chan_mask, DECAY_PC)
    v_th = _param(threshold_ptr, threshold_value, chan, chan_mask, THRESHOLD_PC)
    w = 0.0
    if SELF_REC:
        w = tl.load(weight_ptr + chan, mask=chan_mask, other=0.0).to(tl.float32)
    if HAS_INIT:
        v_init = tl.load(v_init_ptr + offs, mask=mask, other=0.0)
        o_init = tl.load(o_init_ptr + offs, mask=mask, other=0.0)
    else:
        v_init = tl.zeros([BM, BK], dtype=tl.float32)
        o_init = tl.zeros([BM, BK], dtype=tl.float32)
    # Adjoints carried backwards in time: dL/dv[t] and the recurrent part of dL/do[t] (at the
    # last step: the gradients of the final state).
    if HAS_GRAD_LAST:
        grad_v = tl.load(grad_v_last_ptr + offs, mask=mask, other=0.0)
        grad_o = tl.load(grad_o_last_ptr + offs, mask=mask, other=0.0)
    else:
        grad_v = tl.zeros([BM, BK], dtype=tl.float32)
        grad_o = tl.zeros([BM, BK], dtype=tl.float32)
    acc_decay = tl.zeros([BM, BK], dtype=tl.float32)
    acc_threshold = tl.zeros([BM, BK], dtype=tl.float32)
    acc_weight = tl.zeros([BM, BK], dtype=tl.float32)

    for cc in range(NUM_CHUNKS):
        t0 = (NUM_CHUNKS - 1 - cc) * CHUNK
        v_start = v_init
        o_start = o_init
        if NUM_CHUNKS > 1:  # chunks after the first start from the state the forward saved
            later = t0 > 0
            slot = (t0 // CHUNK - 1) * STATE_STRIDE
            v_saved = tl.load(chunk_state_ptr + slot + offs, mask=mask & later, other=0.0)
            v_start = tl.where(later, v_saved, v_init)
            if SELF_REC:
                o_saved = tl.load(chunk_state_ptr + slot + N + offs, mask=mask & later, other=0.0)
                o_start = tl.where(later, o_saved, o_init)

        # Replay the chunk forward, keeping each step's charge h: an unrolled tuple of tiles,
        # so every step's tile stays in the registers and layout its load gave it.
        hs = ()
        v = v_start
        o = o_start
        for i in tl.static_range(CHUNK):
            step_mask = mask
            if not EVEN_T:
                step_mask = mask & (t0 + i < T)
            x = tl.load(x_ptr + (t0 + i) * N + offs, mask=step_mask, other=0.0).to(tl.float32)
            h, o, v = _step(x, v, o, d, v_th, w, v_reset, RESET, SELF_REC)
            hs = hs + (h,)

        # Walk it backwards.
        for s in tl.static_range(CHUNK - 1, -1, -1):
            t = t0 + s
            step_mask = mask
            if not EVEN_T:
                step_mask = mask & (t < T)
            h = hs[s]
            z = h - v_th
            o = (z > 0).to(tl.float32)
            if s > 0:
                h_prev = hs[s - 1]
                fire_prev = (h_prev - v_th) > 0
                v_prev = _reset(h_prev, fire_prev, v_th, v_reset, RESET)
                o_prev = fire_prev.to(tl.float32)
            else:
                v_prev = v_start
                o_prev = o_start

            g_spike = tl.load(grad_spike_ptr + t * N + offs, mask=step_mask, other=0.0).to(tl.float32)
            g_o = g_spike + grad_o  # the output, and the next step's recurrent input
            if not DETACH_RESET:  # the spike also acts through the reset
                if RESET == 0:
                    g_o = g_o + grad_v * (v_reset - h)
                elif RESET == 1:
                    g_o = g_o - grad_v * v_th
            g_z = g_o * _surrogate_grad(z, s1, s2, SURROGATE)
            if RESET == 0:
                g_h = grad_v * (1.0 - o) + g_z
            else:
                g_h = grad_v + g_z
            tl.store(grad_x_ptr + t * N + offs, g_h.to(grad_x_ptr.dtype.element_ty), mask=step_mask)

            g_threshold = -g_z
            if RESET == 1:
                g_threshold = g_threshold - grad_v * o
            new_grad_v = d * g_h
            new_grad_o = w * g_h
            if EVEN_T:
                if NEED_DECAY:
                    acc_decay += g_h * v_prev
                if NEED_THRESHOLD:
                    acc_threshold += g_threshold
                if NEED_WEIGHT:
                    acc_weight += g_h * o_prev
                grad_v = new_grad_v
                grad_o = new_grad_o
            else:  # steps past T (the tail of the last chunk) change nothing
                valid = t < T
                if NEED_DECAY:
                    acc_decay += tl.where(valid, g_h * v_prev, 0.0)
                if NEED_THRESHOLD:
                    acc_threshold += tl.where(valid, g_threshold, 0.0)
                if NEED_WEIGHT:
                    acc_weight += tl.where(valid, g_h * o_prev, 0.0)
                grad_v = tl.where(valid, new_grad_v, grad_v)
                grad_o = tl.where(valid, new_grad_o, grad_o)

    if NEED_INIT:
        tl.store(grad_v_init_ptr + offs, grad_v, mask=mask)
        tl.store(grad_o_init_ptr + offs, grad_o, mask=mask)
    # Per-channel partial sums of this program: over rows when columns are channels, over
    # columns when each row is one channel.
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    if CH_INNER:
        part_offs = (pid // num_k) * K + rk
        part_mask = rk < K
        AXIS: tl.constexpr = 0
    else:
        part_offs = (pid % num_k) * M + rm
        part_mask = rm < M
        AXIS: tl.constexpr = 1
    if NEED_DECAY:
        tl.store(grad_decay_ptr + part_offs, tl.sum(tl.where(mask, acc_decay, 0.0), axis=AXIS), mask=part_mask)
    if NEED_THRESHOLD:
        tl.store(grad_threshold_ptr + part_offs, tl.sum(tl.where(mask, acc_threshold, 0.0), axis=AXIS),
                 mask=part_mask)
    if NEED_WEIGHT:
        tl.store(grad_weight_ptr + part_offs, tl.sum(tl.where(mask, acc_weight, 0.0), axis=AXIS), mask=part_mask)


# ---------------------------------------------------------------------------------------------
# Launch plans
# ---------------------------------------------------------------------------------------------


def _is_dense(t: Tensor) -> bool:
    """``t`` fills one block of memory without gaps or overlaps, in any axis order."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _is_time_major_dense(x: Tensor) -> bool:
    """Time is the outermost axis and each step ``x[t]`` is one dense block of memory."""
    step = x[0]
    return (x.shape[0] == 1 or x.stride(0) == step.numel()) and _is_dense(step)


class _Tiling(NamedTuple):
    """One step ``[N]`` (in memory order) as ``[M, K]`` rows cut into ``[BM, BK]`` program tiles;
    the channel is the column (``ch_inner``) or ``row % C``."""

    M: int
    K: int
    C: int
    ch_inner: bool
    BM: int
    BK: int

    @property
    def grid(self) -> int:
        return triton.cdiv(self.M, self.BM) * triton.cdiv(self.K, self.BK)

    def partial_shape(self) -> tuple[int, int]:
        """Per-program partial sums: [row blocks, C] or [column blocks, M] (M = A * C rows)."""
        if self.ch_inner:
            return triton.cdiv(self.M, self.BM), self.K
        return triton.cdiv(self.K, self.BK), self.M


def _row_block(K: int, block: int) -> int:
    """Power-of-two tile width for rows of length K: least padding, then widest; at least 32 so a
    warp reads contiguous memory, unless a whole row is shorter."""
    if K <= 32:
        return triton.next_power_of_2(K)
    best, best_padded = 32, triton.cdiv(K, 32) * 32
    width = 64
    while width <= block:
        padded = triton.cdiv(K, width) * width
        if padded <= best_padded:
            best, best_padded = width, padded
        width *= 2
    return best


def _tiling(x: Tensor, per_channel: bool, block: int) -> _Tiling:
    """Tiling of x's steps into programs of ``block`` neurons; without per-channel tensors the
    channel never matters and a step is one flat row."""
    n = x[0].numel()
    if not per_channel or x.ndim < 3 or x.shape[2] == 1:
        return _Tiling(1, n, 1, False, 1, min(block, triton.next_power_of_2(n)))
    C = x.shape[2]
    sc = x.stride(2)
    if sc == 1:
        M, K, ch_inner = n // C, C, True
    else:
        M, K, ch_inner = n // sc, sc, False
    BK = _row_block(K, block)
    return _Tiling(M, K, C, ch_inner, max(1, min(block // BK, triton.next_power_of_2(M))), BK)


def _chunk(steps: int) -> int:
    """Steps the backward replays per chunk: all of them up to MAX_CHUNK, else the fewest chunks
    of equal length (the last one may be shorter)."""
    return triton.cdiv(steps, triton.cdiv(steps, MAX_CHUNK))


def _bwd_block(chunk: int) -> int:
    per_thread = max(1, min(4, MAX_REPLAY_VALUES // chunk))
    return 32 * NUM_WARPS * (1 << (per_thread.bit_length() - 1))  # a power of two


def _surrogate_constants(kind: Surrogate, width: float) -> tuple[float, float]:
    # The Python-float expressions of models.surrogates, so the fp32 constants round the same.
    if kind is Surrogate.rectangular:
        return width / 2, 1 / width
    if kind is Surrogate.sigmoid:
        return width, 0.0
    if kind is Surrogate.atan:
        return math.pi / 2 * width, width / 2
    return width, 1 / (width * width)


def _kernel_layout(x: Tensor) -> Tensor:
    """``x`` as the kernels read it: itself when time-major dense; a time-major copy in the
    memory order of ``x[0]`` when that step is dense (e.g. the stem output broadcast over T for
    direct encoding, channels-last on CUDA: the spikes then feed the next conv in its layout);
    else a contiguous copy."""
    if _is_time_major_dense(x):
        return x
    step = x[0]
    if _is_dense(step):
        out = torch.empty_strided(x.shape, (step.numel(), *step.stride()), dtype=x.dtype, device=x.device)
        return out.copy_(x)
    return x.contiguous()


def _like_step(t: Tensor, x: Tensor) -> Tensor:
    """A ``[B, C, ...]`` state tensor as fp32 in the memory order of ``x[0]``."""
    if tuple(t.shape) != tuple(x.shape[1:]):
        raise ValueError(f"neuron state {tuple(t.shape)} does not match one step {tuple(x.shape[1:])} of the input")
    t = t.to(torch.float32)
    if t.stride() != x[0].stride():
        t = torch.empty_like(x[0], dtype=torch.float32).copy_(t)
    return t


def _step_f32(x: Tensor) -> Tensor:
    return torch.empty_like(x[0], dtype=torch.float32)


def _none_f32(x: Tensor) -> Tensor:
    """Placeholder for an output that was not asked for (custom ops return tensors only)."""
    return x.new_empty(0, dtype=torch.float32)


def _forward_outputs(x: Tensor, self_rec: bool, return_state: bool, needs_backward: bool):
    """Spikes, final membrane and spike, chunk states: allocated alike by the op and its fake."""
    steps, n = x.shape[0], x[0].numel()
    chunks = triton.cdiv(steps, _chunk(steps)) if needs_backward else 1
    chunk_states = x.new_empty((chunks - 1, 2 if self_rec else 1, n), dtype=torch.float32)
    if return_state:
        return torch.empty_like(x), _step_f32(x), _step_f32(x), chunk_states
    return torch.empty_like(x), _none_f32(x), _none_f32(x), chunk_states


def _backward_outputs(x: Tensor, params: tuple[Optional[Tensor], ...], needs: tuple[bool, ...]):
    """grad_x, the per-channel gradients and the initial-state gradients (op and fake)."""
    per_channel = [torch.empty_like(p) if need else _none_f32(x) for p, need in zip(params, needs[:3])]
    init = [_step_f32(x) if needs[3] else _none_f32(x) for _ in range(2)]
    return (torch.empty_like(x), *per_channel, *init)


def _needs(needs_grad: list[bool], decay, v_threshold, recurrent_weight, v_init) -> tuple[bool, ...]:
    return (needs_grad[0] and decay is not None, needs_grad[1] and v_threshold is not None,
            needs_grad[2] and recurrent_weight is not None, needs_grad[3] and v_init is not None)


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("spikescale::lif_forward", mutates_args=())
def lif_forward(
    x: Tensor,
    decay: Optional[Tensor],
    v_threshold: Optional[Tensor],
    recurrent_weight: Optional[Tensor],
    v_init: Optional[Tensor],
    spike_init: Optional[Tensor],
    decay_value: float,
    threshold_value: float,
    reset: str,
    v_reset: float,
    detach_reset: bool,
    surrogate: str,
    surrogate_width: float,
    return_state: bool,
    needs_backward: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """LIF forward over ``x [T, B, ...]`` (time-major dense: see ``_kernel_layout``).

    ``decay`` / ``v_threshold``: per-channel ``[C]`` tensors, or None for ``decay_value`` /
    ``threshold_value``; ``recurrent_weight``: ``[C]`` (self recurrence) or None; ``v_init`` /
    ``spike_init``: fp32 ``[B, ...]`` in ``x[0]``'s strides, or None for zeros.
    ``detach_reset``, ``surrogate`` and ``surrogate_width`` are for the backward.

    Returns:
        spikes (x's dtype and strides); final membrane and spike (fp32 ``[B, ...]``, empty
        unless ``return_state``); the states entering chunks 2.. for the backward (fp32
        ``[chunks - 1, 1 or 2, N]``, none unless ``needs_backward``).
    """
    self_rec = recurrent_weight is not None
    spikes, v_last, o_last, chunk_states = _forward_outputs(x, self_rec, return_state, needs_backward)
    tiling = _tiling(x, decay is not None or v_threshold is not None or self_rec, FWD_BLOCK)
    has_init = v_init is not None
    _lif_fwd_kernel[(tiling.grid,)](
        x, spikes, chunk_states, v_init, spike_init, v_last, o_last,
        decay, v_threshold, recurrent_weight,
        decay_value, threshold_value, v_reset,
        x.shape[0], x[0].numel(), tiling.M, tiling.K, tiling.C, chunk_states[0].numel() if chunk_states.shape[0] else 0,
        BM=tiling.BM, BK=tiling.BK, CH_INNER=tiling.ch_inner, CHUNK=_chunk(x.shape[0]),
        RESET=_RESET_CODE[Reset(reset)], SELF_REC=self_rec,
        DECAY_PC=decay is not None, THRESHOLD_PC=v_threshold is not None,
        HAS_INIT=has_init, SAVE_CHUNK_STATES=chunk_states.shape[0] > 0, WRITE_STATE=return_state,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # no FMA: the reference rounds d * v before adding x
    )
    return spikes, v_last, o_last, chunk_states


@lif_forward.register_fake
def _lif_forward_fake(x, decay, v_threshold, recurrent_weight, v_init, spike_init, decay_value,
                      threshold_value, reset, v_reset, detach_reset, surrogate, surrogate_width,
                      return_state, needs_backward):
    return _forward_outputs(x, recurrent_weight is not None, return_state, needs_backward)


@torch.library.custom_op("spikescale::lif_backward", mutates_args=())
def lif_backward(
    grad_spikes: Tensor,
    grad_v_last: Optional[Tensor],
    grad_spike_last: Optional[Tensor],
    x: Tensor,
    chunk_states: Tensor,
    decay: Optional[Tensor],
    v_threshold: Optional[Tensor],
    recurrent_weight: Optional[Tensor],
    v_init: Optional[Tensor],
    spike_init: Optional[Tensor],
    decay_value: float,
    threshold_value: float,
    reset: str,
    v_reset: float,
    detach_reset: bool,
    surrogate: str,
    surrogate_width: float,
    needs_grad: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``lif_forward``: gradients of x, decay, threshold, recurrent weight, initial
    membrane and initial spike. ``needs_grad`` (decay, threshold, weight, initial state) says
    which are wanted; the others come back empty. ``grad_v_last`` / ``grad_spike_last``: the
    final state's gradients, None when it was not used."""
    steps = x.shape[0]
    needs = _needs(needs_grad, decay, v_threshold, recurrent_weight, v_init)
    outputs = _backward_outputs(x, (decay, v_threshold, recurrent_weight), needs)
    grad_x, grad_v_init, grad_o_init = outputs[0], outputs[4], outputs[5]
    if grad_spikes.dtype != x.dtype or grad_spikes.stride() != x.stride():
        grad_spikes = torch.empty_like(x).copy_(grad_spikes)  # e.g. the expanded ones of .sum()
    has_grad_last = grad_v_last is not None or grad_spike_last is not None
    if has_grad_last:
        grad_v_last = _like_step(grad_v_last, x) if grad_v_last is not None else torch.zeros_like(_step_f32(x))
        grad_spike_last = (_like_step(grad_spike_last, x) if grad_spike_last is not None
                           else torch.zeros_like(_step_f32(x)))
    self_rec = recurrent_weight is not None
    chunk = _chunk(steps)
    if chunk_states.shape[0] != triton.cdiv(steps, chunk) - 1:
        raise RuntimeError("lif_backward: the forward ran with needs_backward=False and saved no chunk states")
    tiling = _tiling(x, decay is not None or v_threshold is not None or self_rec, _bwd_block(chunk))
    parts = [x.new_empty(tiling.partial_shape() if need else 0, dtype=torch.float32) for need in needs[:3]]
    s1, s2 = _surrogate_constants(Surrogate(surrogate), surrogate_width)
    _lif_bwd_kernel[(tiling.grid,)](
        x, grad_spikes, grad_x, chunk_states, v_init, spike_init,
        grad_v_last, grad_spike_last, grad_v_init, grad_o_init,
        decay, v_threshold, recurrent_weight, *parts,
        decay_value, threshold_value, v_reset, s1, s2,
        steps, x[0].numel(), tiling.M, tiling.K, tiling.C,
        chunk_states[0].numel() if chunk_states.shape[0] else 0, triton.cdiv(steps, chunk),
        BM=tiling.BM, BK=tiling.BK, CH_INNER=tiling.ch_inner, CHUNK=chunk,
        EVEN_T=steps % chunk == 0, RESET=_RESET_CODE[Reset(reset)], SELF_REC=self_rec,
        DETACH_RESET=detach_reset, SURROGATE=_SURROGATE_CODE[Surrogate(surrogate)],
        DECAY_PC=decay is not None, THRESHOLD_PC=v_threshold is not None,
        HAS_INIT=v_init is not None, HAS_GRAD_LAST=has_grad_last,
        NEED_DECAY=needs[0], NEED_THRESHOLD=needs[1], NEED_WEIGHT=needs[2], NEED_INIT=needs[3],
        num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    per_channel = list(outputs[1:4])
    for i, (part, need) in enumerate(zip(parts, needs[:3])):
        if need:
            # Column blocks x rows (row = a * C + c) or row blocks x channels: channel = last axis.
            per_channel[i].copy_(part.view(-1, tiling.C).sum(0))
    return (grad_x, *per_channel, grad_v_init, grad_o_init)


@lif_backward.register_fake
def _lif_backward_fake(grad_spikes, grad_v_last, grad_spike_last, x, chunk_states, decay,
                       v_threshold, recurrent_weight, v_init, spike_init, decay_value,
                       threshold_value, reset, v_reset, detach_reset, surrogate, surrogate_width,
                       needs_grad):
    needs = _needs(needs_grad, decay, v_threshold, recurrent_weight, v_init)
    return _backward_outputs(x, (decay, v_threshold, recurrent_weight), needs)


def _setup_context(ctx, inputs, output) -> None:
    x, decay, v_threshold, recurrent_weight, v_init, spike_init, *scalars = inputs
    chunk_states = output[3]
    ctx.save_for_backward(x, chunk_states, decay, v_threshold, recurrent_weight, v_init, spike_init)
    ctx.scalars = scalars[:7]  # decay_value .. surrogate_width, the backward's static arguments
    ctx.mark_non_differentiable(chunk_states)
    ctx.set_materialize_grads(False)  # an unused final state costs nothing in backward


def _backward(ctx, grad_spikes, grad_v_last, grad_spike_last, _grad_chunk_states):
    x, chunk_states, decay, v_threshold, recurrent_weight, v_init, spike_init = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_spikes is None:  # only the final state was used
        grad_spikes = torch.zeros_like(x)
    # Gradients of a final state that was not returned (empty placeholders) may arrive as
    # empty tensors when AOTAutograd materialises every tangent.
    if grad_v_last is not None and grad_v_last.numel() == 0:
        grad_v_last = grad_spike_last = None
    grads = lif_backward(
        grad_spikes, grad_v_last, grad_spike_last, x, chunk_states, decay, v_threshold,
        recurrent_weight, v_init, spike_init, *ctx.scalars,
        needs_grad=[needs[1], needs[2], needs[3], needs[4] or needs[5]],
    )
    # The initial spike only acts through self recurrence; without it the reference leaves it
    # out of the graph, and so do we.
    wanted = (needs[0], needs[1], needs[2], needs[3], needs[4] and v_init is not None,
              needs[5] and v_init is not None and recurrent_weight is not None)
    return (*(g if w else None for g, w in zip(grads, wanted)), *([None] * 9))


lif_forward.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# The neuron implementation
# ---------------------------------------------------------------------------------------------


_COVERED_RECURRENCE = (Recurrence.none, Recurrence.self)


def _takes_input(x: Tensor) -> bool:
    """fp32/bf16/fp16 on CUDA (or on the CPU under ``TRITON_INTERPRET=1``), fewer than 2**31
    elements (the kernels use 32-bit offsets)."""
    return ((x.is_cuda or (INTERPRET and x.device.type == "cpu")) and x.dtype in SUPPORTED_DTYPES
            and x.ndim >= 2 and 0 < x.numel() < 2**31)


def accepts(x: Tensor, spec: LIFSpec) -> bool:
    """Whether the fused kernels take this call: recurrence none or self, on an input they take
    (``_takes_input``)."""
    return spec.recurrence in _COVERED_RECURRENCE and _takes_input(x)


def declines(x: Tensor, spec: LIFSpec) -> str | None:
    """Why an input the kernels take runs the reference loop: a recurrence they do not cover."""
    if _takes_input(x) and spec.recurrence not in _COVERED_RECURRENCE:
        return (f"recurrence={spec.recurrence.value} runs the PyTorch reference loop on {x.device.type} "
                "(the fused Triton kernel covers recurrence none and self)")
    return None


def lif_triton(
    x: Tensor,
    decay: Tensor | float,
    v_threshold: Tensor | float,
    recurrent_weight: Tensor | None,
    state: LIFState | None,
    spec: LIFSpec,
    *,
    return_state: bool = True,
) -> tuple[Tensor, LIFState | None]:
    """The LIF op on the fused kernels (``NeuronImplFn`` of ``models.neurons``).

    Args:
        x: input current ``[T, B, C, ...]`` or ``[T, B]`` (fp32, bf16 or fp16), any strides;
            time-major dense layouts (contiguous, channels-last) are used in place.
        decay: ``tau_decay`` (1 for IF) or a per-channel ``[C]`` tensor (learnable decay).
        v_threshold: V_th or a per-channel ``[C]`` tensor.
        recurrent_weight: ``[C]`` for self recurrence, None for none.
        state: the state to continue from; zeros if None.
        spec: the static configuration (recurrence none or self).
        return_state: compute the final state (an fp32 ``[B, C, ...]`` write each for membrane
            and spike); without it the second result is None.

    Returns:
        spikes ``[T, B, C, ...]`` in x's dtype and strides, and the final ``LIFState`` (fp32)
        or None.
    """
    if not accepts(x, spec):
        raise ValueError(f"lif_triton does not take input {tuple(x.shape)} {x.dtype} on {x.device} with {spec}")
    x = _kernel_layout(x)
    v_init = spike_init = None
    if state is not None:
        v_init, spike_init = _like_step(state.v, x), _like_step(state.spike, x)
    decay_t = decay.contiguous() if isinstance(decay, Tensor) else None
    threshold_t = v_threshold.contiguous() if isinstance(v_threshold, Tensor) else None
    weight_t = recurrent_weight.contiguous() if spec.recurrence is Recurrence.self else None
    tensors = (x, decay_t, threshold_t, weight_t, v_init, spike_init)
    needs_backward = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    spikes, v_last, o_last, _ = lif_forward(
        *tensors,
        0.0 if decay_t is not None else float(decay),
        0.0 if threshold_t is not None else float(v_threshold),
        spec.reset.value, spec.v_reset, spec.detach_reset, spec.surrogate.value,
        spec.surrogate_width, return_state, needs_backward,
    )
    return spikes, (LIFState(v_last, o_last) if return_state else None)


register_neuron_impl("triton", accepts, lif_triton, declines)
