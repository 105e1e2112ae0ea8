"""Surrogate gradients for the spike nonlinearity.

The forward pass of a spiking neuron is the Heaviside step ``o = H(z)`` with ``z = u - V_th``
(a spike when the membrane ``u`` is strictly above the threshold). Its true derivative is zero
almost everywhere, so the backward pass substitutes a surrogate ``dH/dz ~= g(z)``. Every
surrogate here integrates to 1 over the real line, i.e. it is the derivative of a smooth step
that goes from 0 to 1, so the width parameter changes how local the gradient is, not its total
mass.

``width`` is the one shape parameter of each surrogate (``NeuronConfig.surrogate_width``):

- rectangular(a): ``g(z) = (1/a) * 1(|z| < a/2)``. STBP-tdBN's choice, a = 1.
- sigmoid(alpha): ``g(z) = alpha * s * (1 - s)`` with ``s = sigmoid(alpha * z)``.
- atan(alpha): ``g(z) = (alpha/2) / (1 + (pi/2 * alpha * z)^2)``.
- triangle(gamma): ``g(z) = (1/gamma^2) * max(0, gamma - |z|)``.

The ``Surrogate`` choices are defined in ``models.neuron_config`` (read by the config schema
without torch) and re-exported here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.neuron_config import Surrogate

__all__ = ["Surrogate", "surrogate_grad", "spike"]


def surrogate_grad(z: Tensor, kind: Surrogate, width: float) -> Tensor:
    """Surrogate derivative ``g(z) ~= dH/dz`` of the spike, elementwise.

    Args:
        z: membrane minus threshold, any shape, any float dtype.
        kind: which surrogate (formulas in the module docstring).
        width: a (rectangular), alpha (sigmoid, atan) or gamma (triangle); > 0.

    Returns:
        Tensor of ``z``'s shape and dtype.
    """
    if kind is Surrogate.rectangular:
        return (z.abs() < width / 2).to(z.dtype) / width
    if kind is Surrogate.sigmoid:
        s = torch.sigmoid(width * z)
        return width * s * (1 - s)
    if kind is Surrogate.atan:
        return (width / 2) / (1 + (math.pi / 2 * width * z) ** 2)
    if kind is Surrogate.triangle:
        return (width - z.abs()).clamp(min=0) / (width * width)
    raise ValueError(f"unknown surrogate {kind!r}")


class _Spike(torch.autograd.Function):
    """Heaviside forward, surrogate backward."""

    @staticmethod
    def forward(z: Tensor, kind: Surrogate, width: float) -> Tensor:
        return (z > 0).to(z.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, kind, width = inputs
        ctx.save_for_backward(z)
        ctx.kind = kind
        ctx.width = width

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (z,) = ctx.saved_tensors
        return grad_out * surrogate_grad(z, ctx.kind, ctx.width), None, None


def spike(z: Tensor, kind: Surrogate, width: float) -> Tensor:
    """Spikes ``H(z)`` (1 where ``z > 0``, else 0) with the surrogate gradient in backward.

    Args:
        z: membrane minus threshold, any shape; the output has the same shape and dtype.
        kind: surrogate used for ``d spike / d z``.
        width: its width parameter (see ``surrogate_grad``).
    """
    return _Spike.apply(z, kind, width)
