"""Spiking MLP: timm registration, encodings and shapes, parameter count, recurrence, firing
accounting, checkpointing modes, compilation, and neuron state carried across a stream."""

import copy

import pytest
import timm
import torch

import models.zoo  # registers the spiking networks
from models import checkpointing
from models.firing import (
    firing_counts,
    firing_report,
    reset_firing_counts,
    set_firing_recording,
)
from models.mlp import NORMS, SpikingMLP, SpikingMLPArgumentError, TdBN1d
from models.neurons import LIF
from models.tdbn import TdBN

RECURRENCES = ["none", "self", "lateral"]


def _mlp(**kwargs) -> SpikingMLP:
    args = dict(T=4, num_classes=5, in_chans=6, hidden=(16, 12))
    args.update(kwargs)
    return timm.create_model("spiking_mlp", **args)


def _make_recurrence_matter(model: SpikingMLP, std: float = 0.3) -> None:
    for m in model.modules():  # recurrent weights start at zero
        if isinstance(m, LIF) and m.recurrent_weight is not None:
            torch.nn.init.normal_(m.recurrent_weight, std=std)


def _randomise_running_stats(model: SpikingMLP) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def _calibrate_running_stats(model: SpikingMLP, x) -> None:
    """Running statistics equal to the batch statistics of ``x`` (one training-mode pass with a
    cumulative average), so the net fires in eval mode as it does in training."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    model.eval()


def test_spiking_mlp_is_registered_with_timm_and_exported():
    assert "spiking_mlp" in timm.list_models("spiking_*")
    assert models.SpikingMLP is SpikingMLP
    model = timm.create_model("spiking_mlp", T=3, num_classes=7, in_chans=8, neuron=dict(reset="soft"))
    assert isinstance(model, SpikingMLP)
    assert (model.T, model.num_classes, model.in_chans, model.num_features) == (3, 7, 8, 128)
    assert all(m.neuron.reset.value == "soft" for m in model.modules() if isinstance(m, LIF))


def test_factory_rejects_unknown_arguments_pretrained_and_bad_architecture():
    with pytest.raises(SpikingMLPArgumentError, match="nueron"):
        timm.create_model("spiking_mlp", nueron=dict(reset="soft"))
    with pytest.raises(SpikingMLPArgumentError, match="pretrained"):
        timm.create_model("spiking_mlp", pretrained=True)
    with pytest.raises(ValueError, match="norm"):
        _mlp(norm="layernorm")
    with pytest.raises(ValueError, match="hidden"):
        _mlp(hidden=())


@pytest.mark.parametrize("shape, steps", [
    ((5, 3, 6), 5),           # a sequence [T', B, F] runs its own T' steps
    ((3, 6), 4),              # a static batch [B, F] is presented at each of T = 4 steps
    ((3, 6, 1, 1), 4),        # an image batch [B, C, H, W] is flattened to C*H*W features
    ((5, 3, 1, 2, 3), 5),     # a frame sequence [T', B, C, H, W] likewise, per step
])
def test_output_shapes_and_forward_is_the_mean_of_the_per_step_logits(shape, steps):
    torch.manual_seed(0)
    model = _mlp().eval()
    _randomise_running_stats(model)
    x = torch.randn(shape) * 2
    with torch.no_grad():
        per_step = model.forward_steps(x)
        logits = model(x)
    assert per_step.shape == (steps, 3, 5)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits, per_step.mean(0))


def test_input_with_the_wrong_features_or_rank_is_one_clear_error():
    model = _mlp()
    with pytest.raises(ValueError, match=r"64 features per step .* in_chans=6; set model.in_chans to 64"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, F\], \[T, B, F\]"):
        model(torch.randn(6))


@pytest.mark.parametrize("train", [True, False])
def test_static_input_equals_repeating_it_over_time(train):
    torch.manual_seed(0)
    model = _mlp(neuron=dict(recurrence="lateral")).train(train)
    _make_recurrence_matter(model)
    if not train:
        _randomise_running_stats(model)
    x = torch.randn(8, 6)
    with torch.no_grad():
        direct = model.forward_steps(x)
        repeated = model.forward_steps(x.unsqueeze(0).expand(4, -1, -1))
    torch.testing.assert_close(direct, repeated, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recurrence", RECURRENCES)
@pytest.mark.parametrize("norm", NORMS)
def test_every_recurrence_and_norm_trains_forward_and_backward(recurrence, norm):
    torch.manual_seed(0)
    model = _mlp(neuron=dict(recurrence=recurrence), norm=norm).train()
    _make_recurrence_matter(model, std=0.1)
    x, y = torch.randn(6, 8, 6) * 2, torch.randint(0, 5, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    if recurrence == "none":
        assert all(m.recurrent_weight is None for m in lifs)
    else:
        # The recurrent weights learn: their gradient reaches them through the surrogate.
        assert all(m.recurrent_weight.grad.abs().sum() > 0 for m in lifs)
    norms = {TdBN1d: "tdbn", torch.nn.BatchNorm1d: "bn", torch.nn.Identity: "none"}
    assert {norms[type(block.bn)] for block in model.layers} == {norm}


@pytest.mark.parametrize("recurrence", RECURRENCES)
@pytest.mark.parametrize("norm", NORMS)
def test_parameter_count_matches_the_hand_formula(recurrence, norm):
    model = _mlp(neuron=dict(recurrence=recurrence), norm=norm, in_chans=6, hidden=(16, 12), num_classes=5)
    expected = 0
    for fan_in, width in ((6, 16), (16, 12)):
        expected += fan_in * width                   # the linear weight
        expected += width if norm == "none" else 0   # its bias, redundant before a norm
        expected += 0 if norm == "none" else 2 * width   # lambda and beta (tdBN) / gamma and beta
        expected += {"none": 0, "self": width, "lateral": width * width}[recurrence]
    expected += 12 * 5 + 5                           # the classifier
    assert sum(p.numel() for p in model.parameters()) == expected


def test_default_spiking_mlp_size():
    model = timm.create_model("spiking_mlp")  # 8 features per step (sequential digits), 128-128
    assert sum(p.numel() for p in model.parameters()) == 8 * 128 + 2 * 128 + 128 * 128 + 2 * 128 + 128 * 10 + 10


def test_tdbn1d_is_tdbn_over_the_folded_batch():
    torch.manual_seed(0)
    bn = TdBN1d(4, alpha=1.0, v_threshold=0.3).train()
    ref = TdBN(4, alpha=1.0, v_threshold=0.3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(bn.weight)
    x = torch.randn(20, 4) * 3 + 1
    torch.testing.assert_close(bn(x), ref(x[:, :, None, None]).flatten(1))
    torch.testing.assert_close(bn.norm.running_mean, ref.norm.running_mean)
    # alpha * V_th * (x - mean) / std with lambda = 1 would have std 0.3 per feature.
    out = TdBN1d(4, v_threshold=0.3).train()(x)
    torch.testing.assert_close(out.std(0, unbiased=False), torch.full((4,), 0.3), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("recurrence", RECURRENCES)
@pytest.mark.parametrize("sequence", [True, False])
def test_firing_report_counts_every_synapse_and_the_first_layer_macs(recurrence, sequence):
    torch.manual_seed(0)
    model = _mlp(neuron=dict(recurrence=recurrence)).train()  # batch statistics: it fires
    _make_recurrence_matter(model)
    set_firing_recording(model, True)
    reset_firing_counts(model)
    x = torch.randn(5, 3, 6) * 2 if sequence else torch.randn(3, 6) * 2
    with torch.no_grad():
        model(x)
    counts = firing_counts(model)
    assert list(counts) == ["layers.0.lif", "layers.1.lif"]
    assert model.spike_consumers() == {"layers.0.lif": ["layers.1.fc"], "layers.1.lif": ["fc"]}
    report = firing_report(counts, model, images=3)
    spikes0, spikes1 = counts["layers.0.lif"][0].item(), counts["layers.1.lif"][0].item()
    assert spikes0 > 0 and spikes1 > 0
    # Fan-out: layer 0 -> 12 neurons of layer 1, layer 1 -> 5 logits; recurrence adds 1 (self)
    # or the layer's own width (lateral) per spike.
    recurrent = {"none": (0, 0), "self": (1, 1), "lateral": (16, 12)}[recurrence]
    sops = spikes0 * (12 + recurrent[0]) + spikes1 * (5 + recurrent[1])
    assert report["sops_per_image"] == pytest.approx(sops / 3)
    macs = (5 if sequence else 1) * 6 * 16  # the first linear layer, per step it runs
    assert model.first_layer_macs_per_image() == macs
    assert report["energy_uj_per_image"] == pytest.approx((4.6 * macs + 0.9 * sops / 3) * 1e-6)
    steps = 5 if sequence else 4
    assert counts["layers.0.lif"][1].item() == steps * 3 * 16
    assert report["firing_rate/layers.0.lif"] == pytest.approx(spikes0 / (steps * 3 * 16))


def _step(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("x_shape", [(4, 6), (5, 4, 6)], ids=["static", "sequence"])
@pytest.mark.parametrize("mode", ["blocks", "blocks+time"])
def test_every_checkpointing_mode_gives_the_gradients_stats_and_counts_of_none(x_shape, mode):
    torch.manual_seed(0)
    x, y = torch.randn(x_shape) * 2, torch.tensor([0, 1, 2, 3])
    runs = []
    for m in ("none", mode):
        torch.manual_seed(1)
        model = _mlp(T=5, neuron=dict(recurrence="lateral")).train()
        _make_recurrence_matter(model, std=0.1)
        model.set_checkpointing(m, time_chunk=2)
        set_firing_recording(model, True)
        runs.append((model, _step(model, x, y)))
    (plain, g_plain), (ckpt, g_ckpt) = runs
    assert ckpt.grad_checkpointing and not plain.grad_checkpointing
    assert all(b.lif.time_chunk == (2 if mode == "blocks+time" else None) for b in ckpt.layers)
    assert g_plain.keys() == g_ckpt.keys()
    # blocks: bit-identical; blocks+time sums the recurrent-weight gradient per chunk.
    tol = dict(rtol=0, atol=0) if mode == "blocks" else dict(rtol=1e-5, atol=1e-7)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], **tol, msg=n)
    # The recomputation in backward updates neither the BatchNorm statistics nor the counts.
    for (n, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), n
    counts_plain, counts_ckpt = firing_counts(plain), firing_counts(ckpt)
    assert all(torch.equal(counts_plain[k], counts_ckpt[k]) for k in counts_plain)


def test_blocks_plus_time_keeps_the_spike_inputs_of_later_layers_at_one_bit_each(monkeypatch):
    packed = []
    real = checkpointing.pack_spikes
    monkeypatch.setattr(checkpointing, "pack_spikes", lambda t: packed.append(t.shape) or real(t))
    model = _mlp(hidden=(16, 12, 8)).train()
    x, y = torch.randn(5, 4, 6), torch.tensor([0, 1, 2, 3])
    model.set_checkpointing("blocks")
    _step(model, x, y)
    assert packed == []
    model.set_checkpointing("blocks+time")
    _step(model, x, y)
    # The input of the first layer is not spikes; the layers after it read 16 and 12 spikes.
    assert packed == [(5, 4, 16), (5, 4, 12)]


def test_set_checkpointing_rejects_unknown_modes():
    model = _mlp()
    with pytest.raises(ValueError, match="checkpointing must be one of"):
        model.set_checkpointing("layers")
    model.set_checkpointing("blocks+time", time_chunk=3)
    model.set_checkpointing("none")
    assert all(b.lif.time_chunk is None for b in model.layers) and not model.grad_checkpointing


@pytest.mark.parametrize("mode", ["none", "blocks"])
def test_compiled_model_trains_as_eager(mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _mlp(neuron=dict(recurrence="self")).train()
    eager.set_checkpointing(mode)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    if mode == "none":
        assert compiled._compiled_call_impl is not None
    else:  # the checkpoint stays outside the compiled code: each hidden layer is compiled
        assert compiled._compiled_call_impl is None
        assert all(b._compiled_call_impl is not None for b in compiled.layers)
    x, y = torch.randn(5, 4, 6), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        grads_e, grads_c = _step(eager, x, y), _step(compiled, x, y)
        for n in grads_e:
            torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, msg=n)


def _forward_steps_from_state(model: SpikingMLP, x, states):
    """``model.forward_steps`` for a sequence ``x [T, B, F]``, each hidden layer starting from
    the ``LIFState`` in ``states`` (None: at rest); also returns the states after the last step."""
    s, after = x, []
    for block, state in zip(model.layers, states):
        s, state = block(s, state=state, return_state=True)
        after.append(state)
    return model.fc(s), after


@pytest.mark.parametrize("recurrence", RECURRENCES)
def test_concatenated_samples_carry_the_neuron_state_across_the_boundary(recurrence):
    torch.manual_seed(0)
    model = _mlp(neuron=dict(recurrence=recurrence)).eval()
    _make_recurrence_matter(model)
    a, b = torch.randn(3, 4, 6) * 2, torch.randn(5, 4, 6) * 2
    # Eval: tdBN normalises with its running statistics, step by step.
    _calibrate_running_stats(model, torch.randn(8, 16, 6) * 2)
    with torch.no_grad():
        stream = model.forward_steps(torch.cat([a, b]))
        logits_a, state_after_a = _forward_steps_from_state(model, a, [None, None])
        logits_b, _ = _forward_steps_from_state(model, b, state_after_a)
        alone = model.forward_steps(b)
    # The net fires, so there is state to carry.
    assert all(state.spike.sum() > 0 and state.v.abs().sum() > 0 for state in state_after_a)
    assert stream.shape == (8, 4, 5)
    torch.testing.assert_close(stream[:3], logits_a)
    torch.testing.assert_close(stream[3:], logits_b)
    # Starting b at rest is not the same: the state a left behind matters.
    assert not torch.allclose(stream[3:], alone)
