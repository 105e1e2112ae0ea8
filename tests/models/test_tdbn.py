"""tdBN: statistics over T x B x H x W with the alpha * V_th multiplier, running statistics,
and folding into the preceding convolution."""

import gc
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


class _ReplacedNorm(nn.BatchNorm2d):
    """Stands for a norm swapped in after construction (e.g. nn.SyncBatchNorm): not fused."""


def _saved_bytes(fn, *args) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total


def test_fused_tdbn_equals_the_unfused_form_and_saves_only_its_input():
    torch.manual_seed(0)
    x = (torch.randn(12, 8, 6, 6) * 2 + 0.5).requires_grad_()
    fused, plain = TdBN(8, alpha=0.7, v_threshold=0.4), TdBN(8, alpha=0.7, v_threshold=0.4)
    plain.norm = _ReplacedNorm(8, affine=False)
    for bn in (fused, plain):
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 8))
            bn.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    y_f, y_p = fused(x), plain(x)
    torch.testing.assert_close(y_f, y_p)
    grad = torch.randn_like(y_f)
    g_f = torch.autograd.grad(y_f, [x, fused.weight, fused.bias], grad)
    g_p = torch.autograd.grad(y_p, [x, plain.weight, plain.bias], grad)
    for a, b in zip(g_f, g_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fused.norm, key), getattr(plain.norm, key))
    # The unfused form also keeps the normalised tensor for the multiplier's gradient.
    x_bytes = x.numel() * x.element_size()
    assert _saved_bytes(fused, x) < 1.1 * x_bytes
    assert _saved_bytes(plain, x) > 1.9 * x_bytes


def test_tdbn_output_keeps_the_autocast_dtype():
    """Under bf16 autocast the conv output is bf16; tdBN must not promote it to fp32 (the
    neurons would then read and write fp32)."""
    torch.manual_seed(0)
    x = torch.randn(12, 8, 6, 6)
    bn = TdBN(8, alpha=0.7, v_threshold=0.4)
    ref = bn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = TdBN(8, alpha=0.7, v_threshold=0.4)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    # The replaced-norm path keeps the input dtype too.
    plain = TdBN(8)
    plain.norm = _ReplacedNorm(8, affine=False)
    assert plain(x.bfloat16()).dtype == torch.bfloat16


def test_tdbn_takes_bf16_parameters_with_fp32_running_statistics():
    """DeepSpeed's bf16 mode: parameters and input bf16, no autocast, BatchNorm statistics fp32."""
    torch.manual_seed(0)
    x = torch.randn(12, 8, 6, 6)
    ref = TdBN(8, alpha=0.7, v_threshold=0.4)
    bn = TdBN(8, alpha=0.7, v_threshold=0.4)
    with torch.no_grad():
        for m in (ref, bn):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
    bn.load_state_dict(ref.state_dict())
    bn.weight.data, bn.bias.data = bn.weight.data.bfloat16(), bn.bias.data.bfloat16()
    xb = x.bfloat16().requires_grad_()
    y = bn(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(bn.norm.running_mean, ref.norm.running_mean, rtol=1e-2, atol=1e-3)
    y.float().sum().backward()
    assert bn.weight.grad.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16
    bn.eval()
    torch.testing.assert_close(bn(x.bfloat16()).float(), ref.eval()(x), rtol=2e-2, atol=2e-2)


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


def _sync_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from models.tdbn import convert_sync_tdbn

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    whole = torch.randn(8, 4, 3, 3) * 3 + 1
    bn = TdBN(4, alpha=0.7, v_threshold=0.5)
    assert convert_sync_tdbn(bn) == 1
    part = whole[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    y = bn(part)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    torch.save({"y": y.detach(), "grad": part.grad, "mean": bn.norm.running_mean, "var": bn.norm.running_var},
               f"{out}/rank{rank}.pt")
    # The step leaves reference cycles behind that hold on to the process group; freed only at
    # interpreter exit, after the group is torn down, they now and then abort the process.
    del y, bn, part
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.slow
def test_synchronised_tdbn_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sync_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    whole = (torch.randn(8, 4, 3, 3) * 3 + 1).requires_grad_(True)
    bn = TdBN(4, alpha=0.7, v_threshold=0.5)
    y = bn(whole)
    (y * torch.cat([torch.arange(y[:4].numel()).view_as(y[:4])] * 2)).sum().backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), whole.grad, atol=1e-4, rtol=1e-4)
    for r in ranks:
        torch.testing.assert_close(r["mean"], bn.norm.running_mean)
        torch.testing.assert_close(r["var"], bn.norm.running_var)
