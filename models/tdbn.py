"""Threshold-dependent batch normalisation (tdBN, Zheng et al., AAAI 2021).

    x_hat = alpha * V_th * (x - E[x]) / sqrt(Var[x] + eps)
    y     = lambda * x_hat + beta

per channel, with the mean and variance taken over T x B x H x W: the network folds time into
the batch before calling it, so a plain BatchNorm over ``[T*B, C, H, W]`` computes exactly these
statistics. ``alpha = 1`` for layers in series, ``1/sqrt(2)`` for the last BN of a residual
branch and the downsample shortcut's BN (two pre-activations are added there); ``lambda = 1``
and ``beta = 0`` at init.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TdBN", "SyncBatchNorm2d", "convert_sync_tdbn", "fold_tdbn_into_conv"]


class TdBN(nn.Module):
    """tdBN over folded time: ``[T*B, C, H, W] -> [T*B, C, H, W]``.

    The statistics live in an affine-free ``nn.BatchNorm2d`` (``self.norm``); the forward pass runs
    one batch-norm kernel with ``alpha * V_th * weight`` (lambda) and ``bias`` (beta) as its
    affine parameters, so the output keeps the input's dtype and no normalised copy is saved for
    backward. Keeping the module affine-free means ``nn.SyncBatchNorm.convert_sync_batchnorm``
    can swap it for a synchronised one (whose forward then runs, followed by the multiplier)
    without losing the multiplier.

    Args:
        num_features: channels C.
        alpha: 1 in series, 1/sqrt(2) where two branches are added.
        v_threshold: the neurons' threshold V_th (``NeuronConfig.v_threshold``).
        eps, momentum: as in ``nn.BatchNorm2d`` (running statistics serve eval mode).
    """

    def __init__(
        self,
        num_features: int,
        alpha: float = 1.0,
        v_threshold: float = 0.5,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ):
        super().__init__()
        self.num_features = num_features
        self.alpha = float(alpha)
        self.v_threshold = float(v_threshold)
        self.norm = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def scale(self) -> Tensor:
        """Per-channel multiplier ``alpha * V_th * lambda``, shape ``[C]``."""
        return self.alpha * self.v_threshold * self.weight

    def forward(self, x: Tensor) -> Tensor:
        norm = self.norm
        if type(norm) is nn.BatchNorm2d:
            # One batch-norm kernel with the multiplier as its affine weight: output in x's
            # dtype (bf16 under autocast, so the neurons get bf16 current), and nothing besides
            # what the kernel keeps is saved for backward.
            return _batch_norm(norm, x, self.scale(), self.bias)
        # A replaced norm (e.g. nn.SyncBatchNorm for statistics across ranks) keeps its forward.
        x_hat = norm(x)
        scale, bias = self.scale().to(x_hat.dtype), self.bias.to(x_hat.dtype)
        return torch.addcmul(bias[:, None, None], x_hat, scale[:, None, None])

    def extra_repr(self) -> str:
        return f"{self.num_features}, alpha={self.alpha:.4g}, v_threshold={self.v_threshold}"


def _batch_norm(bn: nn.BatchNorm2d, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``bn(x)`` with ``weight`` and ``bias`` as its affine parameters: the same running-statistic
    bookkeeping as ``nn.BatchNorm2d.forward``."""
    if x.dim() != 4:
        raise ValueError(f"TdBN expects [T*B, C, H, W] input, got shape {tuple(x.shape)}")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    if keep_running and bn.running_mean is not None and weight.dtype != bn.running_mean.dtype:
        # The kernel takes affine parameters in the dtype of the running statistics (any input
        # dtype): DeepSpeed's bf16 mode, say, holds parameters in bf16 and these in fp32.
        weight, bias = weight.to(bn.running_mean.dtype), bias.to(bn.running_mean.dtype)
    return F.batch_norm(x, bn.running_mean if keep_running else None, bn.running_var if keep_running else None,
                        weight, bias, use_batch_stats, momentum, bn.eps)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """An affine-free batch norm whose training statistics cover every rank's batch.

    Written here because torch's ``nn.SyncBatchNorm`` refuses CPU tensors (gloo), and the same
    code should run in the CPU tests and on GPUs. Per channel, the sums of x and x^2 and the
    count are all-reduced in one differentiable call (``torch.distributed.nn``), so gradients
    flow to every rank's input as with one process on the concatenated batch. Outside training,
    or with one rank, it is ``nn.BatchNorm2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        channels = x.shape[1]
        x32 = x.float()
        local = torch.cat([x32.sum((0, 2, 3)), (x32 * x32).sum((0, 2, 3)),
                           x32.new_full((1,), x32.numel() / channels)])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = (total[channels:2 * channels] / count - mean * mean).clamp_min(0)  # biased, as BN normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels, 1, 1)
        return ((x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)


def convert_sync_tdbn(model: nn.Module) -> int:
    """Give every ``TdBN`` of ``model`` statistics over all ranks (``SyncBatchNorm2d``), in place,
    keeping its running statistics; returns how many were converted."""
    converted = 0
    for module in model.modules():
        if isinstance(module, TdBN) and type(module.norm) is nn.BatchNorm2d:
            old = module.norm
            new = SyncBatchNorm2d(old.num_features, eps=old.eps, momentum=old.momentum, affine=False,
                                  device=old.running_mean.device, dtype=old.running_mean.dtype)
            new.load_state_dict(old.state_dict())
            module.norm = new
            converted += 1
    return converted


@torch.no_grad()
def fold_tdbn_into_conv(conv: nn.Conv2d, bn: TdBN) -> nn.Conv2d:
    """A convolution equal to ``bn(conv(x))`` with ``bn`` in eval mode (running statistics).

    ``W' = W * s / sigma`` and ``b' = (b - mu) * s / sigma + beta`` per output channel, with
    ``s = alpha * V_th * lambda`` and ``sigma = sqrt(running_var + eps)``. The inputs are not
    modified; the result has a bias and the same geometry, dtype and device as ``conv``.
    """
    if bn.norm.running_mean is None or bn.norm.running_var is None:
        raise ValueError("fold_tdbn_into_conv needs a TdBN that tracks running statistics")
    if conv.out_channels != bn.num_features:
        raise ValueError(
            f"fold_tdbn_into_conv: conv has {conv.out_channels} output channels, "
            f"tdBN has {bn.num_features}"
        )
    factor = bn.scale() / torch.sqrt(bn.norm.running_var + bn.norm.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.norm.running_mean)
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    folded.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1).to(conv.weight.dtype))
    folded.bias.copy_(((bias - bn.norm.running_mean) * factor + bn.bias).to(conv.weight.dtype))
    return folded
