"""Deployment: tdBN folded into the weights gives the same network, and its NIR export, read back
and run with the documented discrete-time semantics, gives the same spikes and logits."""

import nir
import numpy as np
import pytest
import timm
import torch
from torch import nn

import models.zoo  # registers the models with timm
from models.deploy import (NIRExportError, fold_model, fold_tdbn_into_linear, folded_checkpoint,
                           load_folded, simulate_nir, to_nir)
from models.mlp import TdBN1d
from models.neurons import LIF
from models.tdbn import TdBN


def _with_trained_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Running statistics and tdBN lambda/beta away from their initial values, then eval mode."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn_like(x) * 2 + 0.3)
        for m in model.modules():
            if isinstance(m, (TdBN, nn.BatchNorm1d)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.0, 0.4)  # enough current that most layers fire
    return model.eval()


def _spikes_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    spikes = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: spikes.__setitem__(name, out))
             for name, m in model.named_modules() if isinstance(m, LIF)]
    with torch.no_grad():
        logits = model.forward_steps(x)
    for h in hooks:
        h.remove()
    return spikes, logits


def _model_and_input(name: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    if name == "spiking_mlp":
        x = torch.randn(2, model.in_chans)
    else:  # ImageNet-size networks on 32x32: 1x1 at the last stage
        x = torch.randn(2, model.conv1.in_channels, 32, 32)
    # fp64: folding changes the arithmetic (W*s/sigma, then one conv), and in fp32 a membrane
    # within rounding of the threshold can flip a spike depending on the CPU's conv kernels.
    return _with_trained_statistics(model, x).double(), x.double()


def test_fold_tdbn_into_linear_equals_the_norm_after_the_linear_layer():
    torch.manual_seed(0)
    x = torch.randn(64, 6, dtype=torch.float64)
    for bias in (False, True):
        norms = (TdBN1d(4, alpha=0.7, v_threshold=0.4), nn.BatchNorm1d(4), nn.BatchNorm1d(4, affine=False))
        for norm in norms:
            linear = nn.Linear(6, 4, bias=bias).double()
            norm = norm.double()
            with torch.no_grad():
                norm.train()
                norm(linear(x * 3 + 1))
                if hasattr(norm, "weight") and norm.weight is not None:
                    norm.weight.uniform_(0.5, 2.0)
                    norm.bias.uniform_(-1.0, 1.0)
                norm.eval()
                folded = fold_tdbn_into_linear(linear, norm)
                torch.testing.assert_close(folded(x), norm(linear(x)))


# Every network this package registers (spiking_*, and the SEW and MS families beside them).
OUR_MODELS = models.model_names()
# The families whose norms fold_model folds (tdBN and BatchNorm1d after conv<k>/fc<k>); the spiking
# transformers keep their BatchNorm2d and have no NIR mapping (refused below).
CONV_FAMILIES = ("models.resnet", "models.mlp", "models.sew_resnet", "models.ms_resnet")
FOLDED_MODELS = [n for n in OUR_MODELS if timm.models.model_entrypoint(n).__module__ in CONV_FAMILIES]
TRANSFORMERS = [n for n in OUR_MODELS if n not in FOLDED_MODELS]


@pytest.mark.parametrize("name", FOLDED_MODELS)
def test_folded_model_gives_the_same_spikes_and_logits_as_the_model_in_eval(name):
    model, x = _model_and_input(name, T=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_model(model)

    assert not any(isinstance(m, (TdBN, nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())
    spikes, logits = _spikes_and_logits(model, x)
    folded_spikes, folded_logits = _spikes_and_logits(folded, x)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    torch.testing.assert_close(folded_logits, logits, atol=1e-4, rtol=0)
    assert spikes.keys() == folded_spikes.keys()
    for layer, s in spikes.items():
        assert torch.equal(folded_spikes[layer], s), layer
    assert 0.01 < sum(float(s.mean()) for s in spikes.values()) / len(spikes) < 0.9  # the spikes matter
    for k, v in model.state_dict().items():  # the model itself is untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name, x", [("spiking_resnet_tiny", torch.randn(5, 2, 1, 8, 8)),
                                     ("spiking_mlp", torch.randn(5, 2, 8))])
def test_folded_model_matches_on_sequences_too(name, x):
    model = _with_trained_statistics(timm.create_model(name, num_classes=10, T=3), x)
    spikes, logits = _spikes_and_logits(model, x)
    folded_spikes, folded_logits = _spikes_and_logits(fold_model(model), x)
    torch.testing.assert_close(folded_logits, logits, atol=1e-4, rtol=0)
    for layer, s in spikes.items():
        assert torch.equal(folded_spikes[layer], s), layer


def test_fold_model_refuses_a_norm_it_cannot_pair_with_a_layer():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.norm = TdBN(2)

    with pytest.raises(ValueError, match="norm .*conv<k>/fc<k>"):
        fold_model(Odd())


def test_load_folded_rebuilds_the_folded_model_from_its_checkpoint(tmp_path):
    kwargs = dict(T=3, num_classes=10, in_chans=1, neuron=models.NeuronConfig(tau_decay=0.5))
    x = torch.randn(2, 1, 8, 8)
    folded = fold_model(_with_trained_statistics(timm.create_model("spiking_resnet_tiny", **kwargs), x))
    torch.save(folded_checkpoint(folded, "spiking_resnet_tiny", kwargs), tmp_path / "m.pt")
    rebuilt = load_folded(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(rebuilt(x), folded(x))


# ------------------------------------------------------------------------------------- NIR

NIR_CASES = {
    "resnet_tiny": ("spiking_resnet_tiny", {}, (3, 1, 8, 8)),
    "resnet_tiny_if": ("spiking_resnet_tiny", {"neuron": {"leak": False}}, (3, 1, 8, 8)),
    "resnet_tiny_reset_none": ("spiking_resnet_tiny", {"neuron": {"reset": "none"}}, (3, 1, 8, 8)),
    "resnet_tiny_learned_decay_threshold_v_reset": (
        "spiking_resnet_tiny",
        {"neuron": {"learnable_decay": True, "learnable_threshold": True, "v_reset": -0.1}}, (3, 1, 8, 8)),
    "resnet_tiny_bottleneck_head": ("_bottleneck", {}, (3, 1, 8, 8)),
    "mlp_images": ("spiking_mlp", {"in_chans": 64}, (3, 1, 8, 8)),
    "mlp_sequence_if_reset_none": ("spiking_mlp", {"neuron": {"leak": False, "reset": "none"}}, (6, 3, 8)),
    "mlp_sequence_complete_leak": ("spiking_mlp", {"neuron": {"leak": "complete"}}, (6, 3, 8)),
    "mlp_bn": ("spiking_mlp", {"norm": "bn"}, (3, 8)),
    "mlp_no_norm": ("spiking_mlp", {"norm": "none"}, (3, 8)),
}


def _nir_model(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    if name == "_bottleneck":  # a CIFAR-stem bottleneck net with the FC-LIF-FC head (ResNet-19's)
        return models.resnet.SpikingResNet(models.resnet.Bottleneck, (1, 1), (8, 16), stem="cifar",
                                           stem_width=16, head_hidden=12, T=4, num_classes=10, in_chans=1)
    return timm.create_model(name, num_classes=10, T=4, **kwargs)


@pytest.mark.parametrize("case", sorted(NIR_CASES))
def test_nir_export_read_back_and_simulated_reproduces_the_folded_model(case, tmp_path):
    name, kwargs, shape = NIR_CASES[case]
    model = _nir_model(name, kwargs)
    x = torch.randn(*shape)
    _with_trained_statistics(model, x)
    with torch.no_grad():
        for lif in (m for m in model.modules() if isinstance(m, LIF)):
            if lif.decay_logit is not None:
                lif.decay_logit.uniform_(-2, 2)
            if lif.v_threshold is not None:
                lif.v_threshold.uniform_(0.3, 0.7)
    folded = fold_model(model)
    sequence = x.dim() in (3, 5)
    step_shape = tuple(x.shape[2:] if sequence else x.shape[1:])
    nir.write(tmp_path / "model.nir", to_nir(folded, step_shape))
    graph = nir.read(tmp_path / "model.nir")

    steps = x if sequence else x.unsqueeze(0).expand(folded.T, *x.shape)
    logits, nodes = simulate_nir(graph, steps, record=True)
    spikes, expected = _spikes_and_logits(folded, x)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    for layer, s in spikes.items():
        node = f"{layer}.threshold" if f"{layer}.threshold" in graph.nodes else layer
        assert torch.equal(nodes[node], s), layer
    assert 0.01 < sum(float(s.mean()) for s in spikes.values()) / len(spikes) < 0.9


@pytest.mark.parametrize("dt", [1e-4, 1e-3, 1.0])
def test_nir_neurons_are_the_euler_discretisation_of_our_discrete_lif_at_the_given_dt(tmp_path, dt):
    folded = fold_model(timm.create_model("spiking_resnet_tiny", T=4, neuron={"tau_decay": 0.25}).eval())
    nir.write(tmp_path / "model.nir", to_nir(folded, (1, 8, 8), dt=dt))
    graph = nir.read(tmp_path / "model.nir")

    lif = graph.nodes["layer1.0.lif1"]
    assert isinstance(lif, nir.LIF) and lif.tau.shape == (32, 8, 8)
    assert float(graph.metadata["dt"]) == dt and f"dt = {dt!r} s" in str(graph.metadata["neuron_discretisation"])
    # Euler at dt: v + dt/tau*(v_leak - v + r*I) = (1 - dt/tau)*v + (r*dt/tau)*I = 0.25*v + I
    np.testing.assert_allclose(lif.tau, dt / 0.75, rtol=1e-15, atol=0)
    np.testing.assert_allclose(1 - dt / lif.tau, 0.25, rtol=0, atol=1e-15)
    np.testing.assert_allclose(lif.r * dt / lif.tau, 1.0, rtol=0, atol=1e-15)
    assert (lif.v_leak == 0).all() and (lif.v_threshold == 0.5).all() and (lif.v_reset == 0).all()
    # The residual add: the block's last conv and the shortcut both feed the output neuron.
    assert {src for src, dst in graph.edges if dst == "layer2.0.lif2"} == {
        "layer2.0.conv2", "layer2.0.downsample.conv"}
    assert {src for src, dst in graph.edges if dst == "layer1.0.lif2"} == {"layer1.0.conv2", "lif1"}
    assert "Euler" in str(graph.metadata["neuron_discretisation"])
    assert int(graph.metadata["time_steps"]) == 4

    if_graph = to_nir(fold_model(timm.create_model("spiking_resnet_tiny", neuron={"leak": False}).eval()),
                      (1, 8, 8), dt=dt)
    assert isinstance(if_graph.nodes["lif1"], nir.IF)
    np.testing.assert_allclose(if_graph.nodes["lif1"].r * dt, 1.0, rtol=1e-15, atol=0)  # v += dt*r*I = I


@pytest.mark.parametrize("dt", [0.0, -1e-4, float("nan"), float("inf")])
def test_to_nir_refuses_a_time_step_that_is_not_a_positive_number_of_seconds(dt):
    folded = fold_model(timm.create_model("spiking_mlp").eval())
    with pytest.raises(NIRExportError, match="dt="):
        to_nir(folded, (8,), dt=dt)


@pytest.mark.parametrize("name, neuron, match", [
    ("spiking_resnet_tiny", {"reset": "soft"}, "neuron.reset=soft"),
    ("spiking_mlp", {"recurrence": "self"}, "neuron.recurrence=self"),
    ("spiking_mlp", {"recurrence": "lateral"}, "neuron.recurrence=lateral"),
    ("spiking_resnet18", {}, "max pooling"),
])
def test_to_nir_refuses_what_nir_cannot_express_in_one_line(name, neuron, match):
    folded = fold_model(timm.create_model(name, num_classes=10, neuron=neuron).eval())
    shape = (8,) if name == "spiking_mlp" else (3, 32, 32)
    with pytest.raises(NIRExportError, match=match) as info:
        to_nir(folded, shape)
    assert "\n" not in str(info.value)


def test_to_nir_refuses_a_resnet_family_it_does_not_map():
    class OtherResNet(models.resnet.SpikingResNet):  # e.g. SEW/MS: other blocks, other wiring
        pass

    model = OtherResNet(models.resnet.BasicBlock, (1,), (8,), stem="cifar", stem_width=8, in_chans=1)
    with pytest.raises(NIRExportError, match="OtherResNet has no NIR mapping"):
        to_nir(fold_model(model.eval()), (1, 8, 8))


@pytest.mark.parametrize("family", ["spikformer", "spike_driven", "qkformer", "meta_spikeformer"])
def test_to_nir_refuses_each_spiking_transformer_family_in_one_line(family):
    names = sorted((n for n in TRANSFORMERS if n.startswith(family + "_")), key=lambda n: ("cifar" not in n, n))
    if not names:
        pytest.skip(f"no {family} network registered")
    model = timm.create_model(names[0], num_classes=10).eval()  # the smallest: a CIFAR size if any
    with pytest.raises(NIRExportError, match="has no NIR mapping") as info:
        to_nir(fold_model(model), (3, 32, 32))
    assert "\n" not in str(info.value)


def test_to_nir_refuses_a_layer_mixing_if_and_lif_channels():
    model = timm.create_model("spiking_mlp", neuron={"learnable_decay": True})
    with torch.no_grad():
        model.layers[0].lif.decay_logit[0] = 50.0  # sigmoid rounds to exactly 1 in fp32
    with pytest.raises(NIRExportError, match="learnable_decay"):
        to_nir(fold_model(model), (8,))


def test_to_nir_needs_a_folded_model_and_a_fitting_input_shape():
    model = timm.create_model("spiking_resnet_tiny").eval()
    with pytest.raises(ValueError, match="fold_model"):
        to_nir(model, (1, 8, 8))
    with pytest.raises(NIRExportError, match="input shape"):
        to_nir(fold_model(model), (3, 8, 8))


def test_simulate_nir_runs_a_hand_written_lif_graph_step_by_step():
    # One neuron, d = 0.5 (tau = 2, r = 2), V_th = 1, input 0.6 each step:
    # h = 0.6, 0.9, 1.05 (spike, reset to 0), 0.6, ...
    graph = nir.NIRGraph.from_list(
        nir.Affine(weight=np.ones((1, 1), dtype=np.float32), bias=np.zeros(1, dtype=np.float32)),
        nir.LIF(tau=np.array([2.0]), r=np.array([2.0]), v_leak=np.array([0.0]),
                v_threshold=np.array([1.0]), v_reset=np.array([0.0])))
    out = simulate_nir(graph, torch.full((5, 1, 1), 0.6))
    assert out.flatten().tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
