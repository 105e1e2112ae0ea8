"""Activation checkpointing modes: bit-packed spikes, LIF time chunks, and whole networks whose
gradients, BatchNorm statistics and firing counts match `none`."""
import pytest
import timm
import torch
from torch.autograd.graph import saved_tensors_hooks

import models.zoo  # noqa: F401  (registers the spiking models)
from models import checkpointing
from models.checkpointing import pack_spikes, unpack_spikes
from models.firing import capture_spike_totals, firing_counts, set_firing_recording
from models.neurons import LIF, LIFState


@pytest.mark.parametrize("shape", [(3, 2, 5, 7, 7), (1,), (8,), (4, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_unpack_round_trip_uses_one_bit_per_spike(shape, dtype):
    spikes = (torch.rand(shape) > 0.6).to(dtype)
    packed = pack_spikes(spikes)
    assert packed.bits.dtype == torch.uint8
    assert packed.nbytes == -(-spikes.numel() // 8)
    back = unpack_spikes(packed)
    assert back.dtype == dtype and back.shape == spikes.shape
    assert torch.equal(back, spikes)


def test_pack_reads_non_contiguous_layouts_in_logical_order():
    spikes = (torch.rand(2, 3, 8, 5, 5) > 0.5).float()
    channels_last = spikes.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (2, 3))
    transposed = spikes.transpose(0, 1)
    assert torch.equal(unpack_spikes(pack_spikes(channels_last)), spikes)
    assert torch.equal(unpack_spikes(pack_spikes(transposed)), transposed)


NEURONS = [
    dict(),
    dict(reset="soft", surrogate="sigmoid", surrogate_width=4.0),
    dict(recurrence="self", learnable_decay=True),
    dict(recurrence="lateral", learnable_threshold=True, detach_reset=True),
    dict(leak=False, reset="none", surrogate="atan", surrogate_width=2.0),
]


@pytest.mark.parametrize("neuron", NEURONS, ids=lambda n: ",".join(f"{k}={v}" for k, v in n.items()) or "default")
@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_lif_time_chunks_give_the_same_spikes_state_and_gradients(neuron, chunk):
    torch.manual_seed(0)
    T, B, C = 7, 3, 4
    x0 = torch.randn(T, B, C, 5) * 1.5
    start = LIFState(torch.randn(B, C, 5) * 0.3, (torch.rand(B, C, 5) > 0.5).float())
    results = []
    for time_chunk in (None, chunk):
        torch.manual_seed(1)
        lif = LIF(C, neuron).train()
        if lif.recurrent_weight is not None:  # zero at init: make recurrence matter
            torch.nn.init.normal_(lif.recurrent_weight, std=0.3)
        lif.set_time_chunk(time_chunk)
        x = x0.clone().requires_grad_()
        spikes, final = lif(x, state=start, return_state=True)
        (spikes * torch.linspace(-1, 1, spikes.numel()).view_as(spikes)).sum().backward()
        grads = {n: p.grad for n, p in lif.named_parameters()}
        results.append((spikes, final, x.grad, grads))
    (s0, f0, g0, p0), (s1, f1, g1, p1) = results
    assert torch.equal(s0, s1)
    assert torch.equal(f0.v, f1.v) and torch.equal(f0.spike, f1.spike)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-7)
    assert p0.keys() == p1.keys()
    for name in p0:
        torch.testing.assert_close(p1[name], p0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_lif_time_chunks_run_only_when_training_with_gradients(monkeypatch):
    import models.neurons as neurons
    calls = []
    real = neurons.checkpoint
    monkeypatch.setattr(neurons, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    lif = LIF(4)
    lif.set_time_chunk(2)
    x = torch.randn(6, 2, 4, requires_grad=True)
    lif.train()(x)
    assert len(calls) == 3  # 6 steps in chunks of 2
    with torch.no_grad():
        lif(x)  # nothing to recompute without gradients
    lif.eval()(x)
    lif.train()(x[:2])  # one chunk or less: no split
    assert len(calls) == 3
    with pytest.raises(ValueError, match="time chunk"):
        lif.set_time_chunk(0)


def _step(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name, x_shape", [
    ("spiking_resnet_tiny", (4, 1, 8, 8)),          # direct encoding: stem once, broadcast over T
    ("spiking_resnet_tiny", (5, 4, 1, 8, 8)),       # a [T, B, ...] sequence (DVS-like)
])
@pytest.mark.parametrize("mode", ["blocks", "blocks+time"])
def test_every_checkpointing_mode_gives_the_gradients_stats_and_counts_of_none(name, x_shape, mode):
    torch.manual_seed(0)
    x, y = torch.randn(x_shape), torch.tensor([0, 1, 2, 3])
    runs = []
    for m in ("none", mode):
        torch.manual_seed(1)
        model = timm.create_model(name, T=5, neuron=dict(recurrence="self")).train()
        model.set_checkpointing(m, time_chunk=2)
        set_firing_recording(model, True)
        runs.append((model, _step(model, x, y)))
    (plain, g_plain), (ckpt, g_ckpt) = runs
    assert g_plain.keys() == g_ckpt.keys()
    # blocks: bit-identical; blocks+time sums the recurrent-weight gradient per chunk.
    tol = dict(rtol=0, atol=0) if mode == "blocks" else dict(rtol=1e-5, atol=1e-7)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], **tol, msg=n)
    for (n, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), n
    counts_plain, counts_ckpt = firing_counts(plain), firing_counts(ckpt)
    assert all(torch.equal(counts_plain[k], counts_ckpt[k]) for k in counts_plain)


def test_blocks_plus_time_keeps_each_block_input_at_one_bit_per_spike(monkeypatch):
    packed = []
    real = checkpointing.pack_spikes

    def spy(t):
        assert set(t.unique().tolist()) <= {0.0, 1.0}, "a block input that is not spikes was packed"
        out = real(t)
        packed.append((t.numel(), out.nbytes))
        return out

    monkeypatch.setattr(checkpointing, "pack_spikes", spy)
    model = timm.create_model("spiking_resnet18", T=2, num_classes=5).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model.set_checkpointing("blocks")
    _step(model, x, y)
    assert packed == []
    model.set_checkpointing("blocks+time")
    _step(model, x, y)
    assert len(packed) == len(model.blocks()) == 8
    assert all(nbytes == -(-numel // 8) for numel, nbytes in packed)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert all(m.time_chunk == 2 for m in lifs)
    model.set_checkpointing("none")
    assert all(m.time_chunk is None for m in lifs) and not model.grad_checkpointing


def _bytes_saved_for_backward(model, x, monkeypatch):
    """Bytes a forward pass leaves for backward: each saved tensor's storage once, plus the
    bit-packed spikes the model's own hook stores instead of some tensors."""
    storages, packed = {}, []
    real = checkpointing.pack_spikes

    def spy(t):
        out = real(t)
        packed.append(out.nbytes)
        return out

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    monkeypatch.setattr(checkpointing, "pack_spikes", spy)
    with saved_tensors_hooks(keep, lambda t: t):
        model(x)
    return sum(storages.values()) + sum(packed)


def test_blocks_plus_time_saved_activations_grow_with_T_only_by_packed_block_inputs(monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    steps = (4, 8)  # both above time_chunk, so every LIF runs in chunks
    growth = {}  # bytes saved for backward per extra step
    for mode in ("none", "blocks+time"):
        saved = []
        for T in steps:
            torch.manual_seed(0)
            model = timm.create_model("spiking_resnet19", T=T, num_classes=10).train()
            model.set_checkpointing(mode, time_chunk=2)
            block_inputs = []
            for block in model.blocks():
                block.register_forward_pre_hook(
                    lambda _, args: block_inputs.append(args[0].numel() // args[0].shape[0]))
            saved.append(_bytes_saved_for_backward(model, x, monkeypatch))
        growth[mode] = (saved[1] - saved[0]) / (steps[1] - steps[0])
    # 1 bit per spike of every block input, per step (~180 KiB here); the head's few KiB of
    # [T, B, 512] vectors are the only other thing that grows.
    packed_per_step = sum(block_inputs) / 8
    assert packed_per_step <= growth["blocks+time"] <= packed_per_step + 16 * 1024
    assert growth["none"] > 200 * growth["blocks+time"]


def test_unknown_checkpointing_mode_is_refused():
    model = timm.create_model("spiking_resnet_tiny", T=2)
    with pytest.raises(ValueError, match="blocks\\+time"):
        model.set_checkpointing("time")


@pytest.mark.parametrize("mode", ["blocks", "blocks+time"])
def test_a_recomputation_in_backward_reports_nothing_to_the_neuron_context(mode, monkeypatch):
    # Backward inside capture_spike_totals: every block is recomputed there, its LIFs run again,
    # and still each LIF reports once (spike totals and counts alike: one switch covers both).
    runs = []
    real = LIF.forward
    monkeypatch.setattr(LIF, "forward", lambda self, *a, **k: runs.append(self) or real(self, *a, **k))
    torch.manual_seed(0)
    model = timm.create_model("spiking_resnet_tiny", T=3).train()
    model.set_checkpointing(mode, time_chunk=2)
    set_firing_recording(model, True)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    with capture_spike_totals(model) as totals:
        _step(model, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
    assert len(runs) > len(lifs)  # the recomputation ran the block LIFs a second time
    assert len(totals) == len(lifs)
    counts = firing_counts(model)
    assert [c[1].item() for c in counts.values()] == [t[1] for t in totals]  # one call's slots each
