"""tdBN: statistics over T x B x H x W with the alpha * V_th multiplier, running statistics,
and folding into the preceding convolution."""

import math

import pytest
import torch
from torch import nn

from models.tdbn import TdBN, fold_tdbn_into_conv


def test_tdbn_starts_at_lambda_one_beta_zero():
    bn = TdBN(5, alpha=1 / math.sqrt(2), v_threshold=0.5)
    assert torch.equal(bn.weight, torch.ones(5)) and torch.equal(bn.bias, torch.zeros(5))
    torch.testing.assert_close(bn.scale(), torch.full((5,), 0.5 / math.sqrt(2)))


def test_tdbn_normalises_over_time_batch_and_space_with_alpha_vth():
    torch.manual_seed(0)
    T, B, C, H, W = 3, 4, 2, 5, 5
    x = torch.randn(T, B, C, H, W, dtype=torch.float64) * 3 + 1
    bn = TdBN(C, alpha=0.7, v_threshold=0.4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.2]))
    y = bn(x.flatten(0, 1)).unflatten(0, (T, B))

    per_channel = x.transpose(0, 2).reshape(C, -1)  # all T*B*H*W values of each channel
    mean = per_channel.mean(dim=1)
    var = per_channel.var(dim=1, unbiased=False)
    shape = (1, 1, C, 1, 1)
    x_hat = 0.7 * 0.4 * (x - mean.view(shape)) / torch.sqrt(var.view(shape) + 1e-5)
    expected = torch.tensor([1.5, -0.5]).view(shape) * x_hat + torch.tensor([0.1, 0.2]).view(shape)
    torch.testing.assert_close(y, expected.double())

    n = per_channel.shape[1]
    torch.testing.assert_close(bn.norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.norm.running_var, 0.9 + 0.1 * var * n / (n - 1))


def test_tdbn_eval_uses_running_statistics():
    bn = TdBN(2, alpha=1.0, v_threshold=0.5).eval()
    bn.norm.running_mean.copy_(torch.tensor([1.0, -1.0]))
    bn.norm.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.tensor([3.0, 0.0]).view(1, 2, 1, 1)
    # (3 - 1) / 2 * 0.5 = 0.5 ;  (0 + 1) / 0.5 * 0.5 = 1.0 (eps 1e-5 neglected by tolerance)
    torch.testing.assert_close(bn(x).flatten(), torch.tensor([0.5, 1.0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias, stride, groups", [(False, 1, 1), (True, 2, 1), (False, 1, 2)])
def test_fold_into_conv_gives_identical_eval_outputs(bias, stride, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=bias, groups=groups)
    bn = TdBN(6, alpha=1 / math.sqrt(2), v_threshold=0.5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    for _ in range(3):  # non-trivial running statistics
        bn(conv(torch.randn(8, 4, 7, 7) * 2 + 0.3))
    bn.eval()
    x = torch.randn(5, 4, 7, 7)
    folded = fold_tdbn_into_conv(conv, bn)
    assert folded.bias is not None and folded.stride == conv.stride and folded.groups == groups
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_rejects_mismatched_channels():
    with pytest.raises(ValueError, match="output channels"):
        fold_tdbn_into_conv(nn.Conv2d(3, 4, 1), TdBN(5))


def test_sync_batchnorm_conversion_keeps_the_threshold_multiplier():
    bn = nn.Sequential(TdBN(3, alpha=0.5, v_threshold=0.5))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(converted[0], TdBN)
    assert isinstance(converted[0].norm, nn.SyncBatchNorm)
    assert converted[0].scale().tolist() == [0.25, 0.25, 0.25]
