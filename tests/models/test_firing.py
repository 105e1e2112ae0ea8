"""Firing statistics: counts, the zero-cost off switch, fan-out, SOPs and energy."""

import pytest
import timm
import torch
from torch import nn

import models.zoo  # noqa: F401  (registers the timm entry points)
from models.firing import (
    conv_macs,
    firing_counts,
    firing_report,
    recurrent_synapses_per_neuron,
    reset_firing_counts,
    set_firing_recording,
    synapses_per_neuron,
)
from models.neuron_context import NeuronContext
from models.neurons import LIF, LIFState, neuron_context


class TwoLayerNet(nn.Module):
    """conv(1->2, 3x3) -> LIF -> conv(2->3, 3x3) -> LIF -> avgpool -> linear(3->5) on 4x4 images,
    small enough to check SOPs and energy by hand."""

    def __init__(self, T: int = 2, neuron=None):
        super().__init__()
        self.T = T
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.lif1 = LIF(2, neuron, spatial=True)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.lif2 = LIF(3, neuron, spatial=True)
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        y = self.conv1(x).unsqueeze(0).expand(self.T, -1, -1, -1, -1)
        s = self.lif1(y)
        s = self.lif2(self.conv2(s.flatten(0, 1)).unflatten(0, (self.T, -1)))
        return self.fc(s.mean(dim=(-2, -1))).mean(0)

    def spike_consumers(self):
        return {"lif1": ["conv2"], "lif2": ["fc"]}

    def first_layer_macs_per_image(self):
        return float(conv_macs(self.conv1, (1, 4, 4)))


def test_recording_off_never_touches_the_spikes(monkeypatch):
    model = TwoLayerNet()
    monkeypatch.setattr(NeuronContext, "record", lambda self, layer, spikes: pytest.fail("recorded while off"))
    model(torch.randn(2, 1, 4, 4))
    counts = firing_counts(model)
    assert set(counts) == {"lif1", "lif2"}
    assert all(torch.equal(c, torch.zeros(2, dtype=torch.float64)) for c in counts.values())


def test_counts_are_spikes_and_neuron_slots_since_reset():
    torch.manual_seed(0)
    lif = LIF(3)
    model = nn.Sequential(nn.Identity(), lif)
    set_firing_recording(model, True)
    x1, x2 = torch.rand(4, 2, 3, 5, 5), torch.rand(4, 2, 3, 5, 5)
    s1, s2 = model(x1), model(x2)
    counts = firing_counts(model)
    assert list(counts) == ["1"]
    assert counts["1"].dtype == torch.float64
    assert counts["1"].tolist() == [s1.sum().item() + s2.sum().item(), 2 * 4 * 2 * 3 * 5 * 5]
    counts["1"].zero_()  # e.g. an in-place all-reduce: the accumulator is a separate tensor
    assert firing_counts(model)["1"][1].item() == 2 * 4 * 2 * 3 * 5 * 5
    reset_firing_counts(model)
    assert firing_counts(model)["1"].tolist() == [0.0, 0.0]
    set_firing_recording(model, False)
    model(x1)
    assert firing_counts(model)["1"].tolist() == [0.0, 0.0]


def test_counts_use_qualified_module_names_of_the_real_network():
    model = timm.create_model("spiking_resnet_tiny", T=2)
    set_firing_recording(model, True)
    model(torch.randn(2, 1, 8, 8))
    counts = firing_counts(model)
    assert list(counts) == ["lif1", "layer1.0.lif1", "layer1.0.lif2", "layer2.0.lif1", "layer2.0.lif2"]
    assert torch.stack(list(counts.values())).shape == (5, 2)


def test_fanout_counts_synapses_inside_the_input():
    # 3x3, padding 1 on a 4x4 map: per axis the 4 outputs see 2, 3, 3, 2 inputs -> 10 taps,
    # so the mean fan-out is C_out * 10 * 10 / 16.
    assert synapses_per_neuron(nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4)) == 3 * 100 / 16
    # 1x1 stride 2 on 4x4: only 4 of 16 inputs have a synapse to each of the 8 output channels.
    assert synapses_per_neuron(nn.Conv2d(2, 8, 1, stride=2), (2, 4, 4)) == 8 * 4 / 16
    assert synapses_per_neuron(nn.Linear(3, 5), (3,)) == 5.0


@pytest.mark.parametrize("kernel, stride, padding, groups", [(3, 1, 1, 1), (3, 2, 1, 2), (7, 2, 3, 1), (1, 2, 0, 1)])
def test_fanout_matches_brute_force_synapse_count(kernel, stride, padding, groups):
    conv = nn.Conv2d(4, 6, kernel, stride=stride, padding=padding, groups=groups, bias=False)
    shape = (4, 9, 9)
    # Each input neuron alone through an all-ones conv: the outputs it reaches are its synapses.
    with torch.no_grad():
        conv.weight.fill_(1.0)
        one_hot = torch.eye(4 * 9 * 9).view(-1, *shape)
        synapses = (conv(one_hot) != 0).sum().item()
    assert synapses_per_neuron(conv, shape) == pytest.approx(synapses / (4 * 9 * 9))


def test_report_on_hand_checkable_net():
    model = TwoLayerNet()
    set_firing_recording(model, True)
    model(torch.randn(1, 1, 4, 4))  # records the layer shapes; the counts are replaced below
    counts = {
        "lif1": torch.tensor([10.0, 64.0], dtype=torch.float64),
        "lif2": torch.tensor([4.0, 96.0], dtype=torch.float64),
    }
    report = firing_report(counts, model, images=2)
    # SOPs: lif1 -> conv2 (fan-out 3 * 100 / 16 = 18.75), lif2 -> fc (fan-out 5):
    # (10 * 18.75 + 4 * 5) / 2 images = 103.75 per image.
    # First-layer MACs per image: 2 channels * 4 * 4 positions * 1 input * 9 taps = 288.
    assert report == pytest.approx({
        "firing_rate/lif1": 10 / 64,
        "firing_rate/lif2": 4 / 96,
        "firing_rate_mean": 14 / 160,
        "sparsity_mean": 1 - 14 / 160,
        "sops_per_image": 103.75,
        "energy_uj_per_image": (4.6 * 288 + 0.9 * 103.75) * 1e-6,
    })


@pytest.mark.parametrize("recurrence, recurrent_sops", [
    ("none", 0.0),
    ("self", 10 * 1 + 4 * 1),     # one synapse per spike: the neuron's own weight
    ("lateral", 10 * 2 + 4 * 3),  # C synapses per spike: the [C, C] map (a 1x1 conv here)
    # a 3x3 conv C -> C, padding 1, on 4x4 maps: 10 x 10 taps inside the map, C * 100 / 16 per spike
    ("full", 10 * 2 * 100 / 16 + 4 * 3 * 100 / 16),
])
def test_report_counts_the_recurrent_synapses_of_every_spike(recurrence, recurrent_sops):
    model = TwoLayerNet(neuron=dict(recurrence=recurrence))
    set_firing_recording(model, True)
    model(torch.randn(1, 1, 4, 4))
    counts = {
        "lif1": torch.tensor([10.0, 64.0], dtype=torch.float64),
        "lif2": torch.tensor([4.0, 96.0], dtype=torch.float64),
    }
    report = firing_report(counts, model, images=2)
    # Feed-forward SOPs as in the test above: 10 * 18.75 + 4 * 5 = 207.5 over 2 images.
    assert report["sops_per_image"] == pytest.approx((207.5 + recurrent_sops) / 2)
    assert report["energy_uj_per_image"] == pytest.approx((4.6 * 288 + 0.9 * (207.5 + recurrent_sops) / 2) * 1e-6)


@pytest.mark.parametrize("recurrence", ["none", "self", "lateral", "full"])
@pytest.mark.parametrize("neuron_shape", [(4,), (4, 3, 5)], ids=["linear", "conv"])
def test_recurrent_fanout_matches_brute_force_synapse_count(recurrence, neuron_shape):
    # A threshold nobody reaches: each neuron spikes alone (the carried-in spike state) and the
    # neurons its spike charges at the next step are its recurrent synapses.
    lif = LIF(4, dict(recurrence=recurrence, v_threshold=1e9), spatial=len(neuron_shape) == 3)
    if lif.recurrent_weight is not None:
        nn.init.constant_(lif.recurrent_weight, 1.0)
    n = torch.Size(neuron_shape).numel()
    one_hot = torch.eye(n).view(n, *neuron_shape)
    with torch.no_grad():
        _, state = lif(torch.zeros(1, n, *neuron_shape), state=LIFState(torch.zeros_like(one_hot), one_hot),
                       return_state=True)
    assert recurrent_synapses_per_neuron(lif, neuron_shape) == pytest.approx((state.v != 0).sum().item() / n)


def test_report_from_recorded_forward_of_resnet_through_a_wrapper():
    torch.manual_seed(0)
    net = timm.create_model("spiking_resnet_tiny", T=2)
    model = nn.ModuleDict({"module": net})  # stands in for DDP's `module.` prefix
    set_firing_recording(model, True)
    with torch.no_grad():
        net(torch.randn(3, 1, 8, 8))
    counts = firing_counts(model)
    report = firing_report(counts, model, images=3)
    assert set(counts) == {f"module.{n}" for n, m in net.named_modules() if isinstance(m, LIF)}
    # Every neuron layer feeds something; the explicit sum over the wiring gives the same SOPs.
    consumers = net.spike_consumers()
    assert set(consumers) == {n for n, m in net.named_modules() if isinstance(m, LIF)}
    assert consumers["layer1.0.lif2"] == ["layer2.0.conv1", "layer2.0.downsample.conv"]
    sops = sum(
        counts[f"module.{lif}"][0].item()
        * synapses_per_neuron(net.get_submodule(c), neuron_context(net).shapes[net.get_submodule(lif)])
        for lif, cs in consumers.items()
        for c in cs
    )
    assert sops > 0
    assert report["sops_per_image"] == pytest.approx(sops / 3)
    stem_macs = 32 * 8 * 8 * 1 * 9  # direct encoding: the stem runs once per image
    assert report["energy_uj_per_image"] == pytest.approx((4.6 * stem_macs + 0.9 * sops / 3) * 1e-6)
    assert 0 < report["firing_rate_mean"] < 1


def test_report_needs_a_network_that_declares_its_wiring():
    model = nn.Sequential(LIF(2))
    with pytest.raises(TypeError, match="spike_consumers"):
        firing_report(firing_counts(model), model, images=1)


@pytest.mark.parametrize("sequence", [False, True])
def test_first_layer_macs_follow_the_encoding(sequence):
    model = timm.create_model("spiking_resnet18", T=2, num_classes=4)
    set_firing_recording(model, True)
    x = torch.randn(3, 1, 3, 32, 32) if sequence else torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
    per_call = 64 * 16 * 16 * 3 * 7 * 7  # 7x7 stride 2 on 32x32
    # Direct encoding runs the stem once per image; a sequence runs it at each of its 3 steps.
    assert model.first_layer_macs_per_image() == (3 * per_call if sequence else per_call)
