"""SEW-ResNet and MS-ResNet: timm registration, parameter counts against torchvision, the connect
functions and the membrane shortcut, encodings and shapes, checkpointing modes, compilation, and
firing accounting."""

import copy
import math

import pytest
import timm
import torch
import torchvision

import models.zoo  # registers the spiking networks
from models import checkpointing
from models.firing import (conv_macs, firing_counts, firing_report, reset_firing_counts,
                           set_firing_recording, synapses_per_neuron)
from models.ms_resnet import MSBasicBlock, MSResNet
from models.neurons import LIF, NeuronConfig, Reset
from models.resnet import SpikingResNetArgumentError
from models.sew_resnet import SEWBasicBlock, SEWBottleneck, SEWResNet
from models.tdbn import TdBN

SEW = ["sew_resnet18", "sew_resnet34", "sew_resnet50"]
MS = ["ms_resnet18", "ms_resnet34"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sew(connect: str = "ADD", block=SEWBasicBlock, **kwargs) -> SEWResNet:
    """Two stages of two blocks, widths 8 and 16, CIFAR stem: the first stage keeps the stem's
    width (identity shortcuts), the second projects."""
    args = dict(layers=(2, 2), widths=(8, 16), stem="cifar", stem_width=8, T=3, num_classes=5, in_chans=2)
    args.update(kwargs)
    return SEWResNet(block, connect=connect, **args)


def _ms(**kwargs) -> MSResNet:
    args = dict(layers=(2, 2), widths=(8, 16), stem="cifar", stem_width=8, T=3, num_classes=5, in_chans=2)
    args.update(kwargs)
    model = MSResNet(**args)
    for block in model.blocks():  # lambda starts at 0 (identity blocks): make the branches count
        torch.nn.init.uniform_(block.bn2.weight, 0.5, 1.5)
    return model


NETS = {
    "sew-ADD": lambda **kw: _sew("ADD", **kw),
    "sew-IAND": lambda **kw: _sew("IAND", **kw),
    "sew-AND": lambda **kw: _sew("AND", **kw),
    "sew-bottleneck-ADD": lambda **kw: _sew("ADD", SEWBottleneck, widths=(4, 8), **kw),
    "ms": _ms,
}


def _randomise_running_stats(model) -> None:
    for m in model.modules():
        if isinstance(m, TdBN):
            m.norm.running_mean.uniform_(-0.1, 0.1)
            m.norm.running_var.uniform_(0.5, 1.5)


def test_importing_models_zoo_registers_both_families_with_timm():
    assert set(SEW + MS) <= set(timm.list_models())
    assert models.sew_resnet.SEWResNet is SEWResNet and models.ms_resnet.MSResNet is MSResNet
    assert isinstance(timm.create_model("sew_resnet18", T=2), SEWResNet)
    assert isinstance(timm.create_model("ms_resnet18", T=2), MSResNet)


@pytest.mark.parametrize("name, reference, paper_millions", [
    ("sew_resnet18", torchvision.models.resnet18, 11.69),
    ("sew_resnet34", torchvision.models.resnet34, 21.80),
    ("sew_resnet50", torchvision.models.resnet50, 25.56),
    # MS-ResNet in the torchvision layout (maxpool stem, stride-1 first stage without a
    # projection): exactly torchvision's count. The reference code's layout (maxpool unused,
    # stride-2 first stage with a 64x64 conv1x1 + BN projection) has 4,224 more, the paper's
    # 11.69 M / 21.80 M too; this pins the layout we build.
    ("ms_resnet18", torchvision.models.resnet18, 11.69),
    ("ms_resnet34", torchvision.models.resnet34, 21.80),
])
def test_parameter_counts_equal_torchvisions_resnets_and_the_papers(name, reference, paper_millions):
    # tdBN's lambda and beta per channel are BatchNorm's affine parameters; the neurons have none.
    n = _params(timm.create_model(name, num_classes=1000))
    assert n == _params(reference(num_classes=1000))
    assert round(n / 1e6, 2) == paper_millions


@pytest.mark.parametrize("name", ["sew_resnet18", "ms_resnet18"])
def test_factories_take_T_num_classes_in_chans_neuron_and_connect(name):
    extra = dict(connect="IAND") if name.startswith("sew") else {}
    model = timm.create_model(name, T=2, num_classes=7, in_chans=1, neuron=dict(reset="soft", tau_decay=0.5),
                              **extra)
    assert (model.T, model.num_classes, model.conv1.in_channels) == (2, 7, 1)
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    # SEW: stem + 2 per block + 3 projection shortcuts; MS: 2 per block + the final one, no stem LIF.
    assert len(lifs) == (1 + 16 + 3 if name.startswith("sew") else 16 + 1)
    assert all(m.neuron.reset is Reset.soft and m.neuron.tau_decay == 0.5 for m in lifs)
    if name.startswith("sew"):
        assert {b.connect for b in model.blocks()} == {"IAND"} and model.connect == "IAND"
        assert timm.create_model(name).connect == "ADD"
    else:
        assert not hasattr(model, "lif1")
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_bad_connect_unknown_arguments_and_pretrained_are_one_clear_error():
    with pytest.raises(ValueError, match="connect must be one of ADD, IAND, AND; got 'OR'"):
        timm.create_model("sew_resnet18", connect="OR")
    with pytest.raises(ValueError, match="connect must be one of"):
        SEWBasicBlock(4, 4, 1, NeuronConfig(), connect="add")
    for name in SEW[:1] + MS[:1]:
        with pytest.raises(SpikingResNetArgumentError, match="nueron"):
            timm.create_model(name, nueron=dict(reset="soft"))
        with pytest.raises(SpikingResNetArgumentError, match="pretrained"):
            timm.create_model(name, pretrained=True)
        with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[T, B, C, H, W\]"):
            timm.create_model(name)(torch.randn(8, 8))


def _capture(module, store, key):
    return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))


@pytest.mark.parametrize("connect", ["ADD", "IAND", "AND"])
@pytest.mark.parametrize("block_type, in_ch, stride", [
    (SEWBasicBlock, 4, 1),   # identity shortcut: s is the block input
    (SEWBasicBlock, 4, 2),   # projection: s is conv1x1-tdBN-LIF of the input
    (SEWBottleneck, 8, 1),   # 8 -> 4*2 channels, identity
    (SEWBottleneck, 4, 2),
])
def test_sew_block_output_is_the_connect_of_branch_and_shortcut_spikes(connect, block_type, in_ch, stride):
    torch.manual_seed(0)
    ch = 4 if block_type is SEWBasicBlock else 2
    block = block_type(in_ch, ch, stride, NeuronConfig(), connect=connect).train()
    seen = {}
    _capture(block.output_lif, seen, "a")
    if block.downsample is not None:
        _capture(block.downsample.lif, seen, "s")
    x = (torch.rand(3, 2, in_ch, 6, 6) > 0.5).float()
    out = block(x)
    a, s = seen["a"], seen.get("s", x)
    assert a.sum() > 0 and s.sum() > 0
    expected = {"ADD": a + s, "IAND": (1 - a) * s, "AND": a * s}[connect]
    assert torch.equal(out, expected)
    values = set(out.unique().tolist())
    assert values <= ({0.0, 1.0, 2.0} if connect == "ADD" else {0.0, 1.0})


def test_ms_block_is_preactivation_and_adds_membrane_currents():
    torch.manual_seed(0)
    neuron = NeuronConfig()
    identity, project = MSBasicBlock(4, 4, 1, neuron).train(), MSBasicBlock(4, 8, 2, neuron).train()
    x = torch.randn(3, 2, 4, 6, 6)
    # lambda of the branch's last tdBN starts at 0: the block is the identity on the currents.
    assert torch.equal(identity(x), x)
    torch.nn.init.uniform_(identity.bn2.weight, 0.5, 1.5)
    seen = {}
    identity.lif1.register_forward_pre_hook(lambda m, args: seen.__setitem__("lif1_in", args[0]))
    out = identity(x)
    assert seen["lif1_in"] is x  # the block opens with a neuron on its input current
    branch = out - x  # real-valued: currents, not spikes, are added
    assert branch.abs().sum() > 0 and not set(branch.unique().tolist()) <= {0.0, 1.0}
    # The projection reads the same spikes as the branch's first conv.
    _capture(project.lif1, seen, "s")
    project.downsample.conv.register_forward_pre_hook(lambda m, args: seen.__setitem__("d_in", args[0]))
    project(x)
    assert torch.equal(seen["d_in"], seen["s"].flatten(0, 1))
    assert set(seen["s"].unique().tolist()) == {0.0, 1.0}


def test_tdbn_alpha_and_initial_lambda():
    sew = timm.create_model("sew_resnet50", neuron=dict(v_threshold=0.3))
    for name, bn in ((n, m) for n, m in sew.named_modules() if isinstance(m, TdBN)):
        assert bn.alpha == 1.0 and bn.v_threshold == 0.3 and bool((bn.weight == 1).all()), name
    ms = timm.create_model("ms_resnet34", neuron=dict(v_threshold=0.3))
    residual = {f"{n}.bn2" for n, m in ms.named_modules() if isinstance(m, MSBasicBlock)}
    projections = {f"{n}.downsample.bn" for n, m in ms.named_modules()
                   if isinstance(m, MSBasicBlock) and m.downsample is not None}
    assert len(residual) == 16 and len(projections) == 3
    for name, bn in ((n, m) for n, m in ms.named_modules() if isinstance(m, TdBN)):
        assert bn.alpha == (1 / math.sqrt(2) if name in residual | projections else 1.0), name
        assert bn.v_threshold == 0.3
        assert bool((bn.weight == (0 if name in residual else 1)).all()), name


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("shape, steps", [((3, 2, 8, 8), 3), ((4, 3, 2, 8, 8), 4)], ids=["image", "sequence"])
def test_forward_is_the_mean_over_time_of_forward_steps(net, shape, steps):
    torch.manual_seed(0)
    model = NETS[net]().eval()
    _randomise_running_stats(model)
    x = torch.randn(shape) * 2
    with torch.no_grad():
        per_step = model.forward_steps(x)
        logits = model(x)
    assert per_step.shape == (steps, 3, 5)
    torch.testing.assert_close(logits, per_step.mean(0))


@pytest.mark.parametrize("net", ["sew-ADD", "ms"])
@pytest.mark.parametrize("train", [True, False])
def test_direct_encoding_equals_repeating_the_image_over_time(net, train):
    torch.manual_seed(0)
    model = NETS[net]().train(train)
    if not train:
        _randomise_running_stats(model)
    x = torch.randn(4, 2, 8, 8) * 2
    with torch.no_grad():
        direct = model.forward_steps(x)
        repeated = model.forward_steps(x.unsqueeze(0).expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(direct, repeated, rtol=1e-5, atol=1e-5)


def _step(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("mode", ["blocks", "blocks+time"])
def test_every_checkpointing_mode_gives_the_gradients_stats_and_counts_of_none(net, mode, monkeypatch):
    packed = []
    real = checkpointing.pack_spikes

    def spy(t):
        assert set(t.unique().tolist()) <= {0.0, 1.0}, "a block input that is not spikes was packed"
        packed.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(checkpointing, "pack_spikes", spy)
    torch.manual_seed(0)
    x, y = torch.randn(4, 2, 8, 8) * 2, torch.tensor([0, 1, 2, 3])
    runs = []
    for m in ("none", mode):
        torch.manual_seed(1)
        model = NETS[net](neuron=dict(recurrence="self")).train()
        model.set_checkpointing(m, time_chunk=2)
        set_firing_recording(model, True)
        packed.clear()
        runs.append((model, _step(model, x, y)))
    (plain, g_plain), (ckpt, g_ckpt) = runs
    assert ckpt.grad_checkpointing and ckpt.checkpointing == mode
    assert g_plain.keys() == g_ckpt.keys()
    # blocks: bit-identical; blocks+time sums the recurrent-weight gradient per chunk.
    tol = dict(rtol=0, atol=0) if mode == "blocks" else dict(rtol=1e-5, atol=1e-7)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], **tol, msg=n)
    for (n, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), n
    counts_plain, counts_ckpt = firing_counts(plain), firing_counts(ckpt)
    assert all(torch.equal(counts_plain[k], counts_ckpt[k]) for k in counts_plain)
    # What blocks+time stores at 1 bit: every block input that is 0/1 and none other.
    if mode == "blocks":
        expected = 0
    elif net == "ms":
        expected = 0  # block inputs are membrane currents
    elif net.endswith("ADD"):
        expected = 1  # the stem's spikes; every later block input is a sum
    else:
        expected = len(ckpt.blocks())
    assert len(packed) == expected


@pytest.mark.parametrize("net", ["sew-ADD", "ms"])
@pytest.mark.parametrize("mode", ["none", "blocks"])
def test_compiled_model_trains_as_eager(net, mode):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = NETS[net]().train()
    eager.set_checkpointing(mode)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")  # traced and split into forward/backward graphs, no codegen
    if mode == "none":
        assert compiled._compiled_call_impl is not None
    else:  # the checkpoint stays outside the compiled code: each block is compiled
        assert compiled._compiled_call_impl is None
        assert all(b._compiled_call_impl is not None for b in compiled.blocks())
    x, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        grads_e, grads_c = _step(eager, x, y), _step(compiled, x, y)
        for n in grads_e:
            torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(eager.state_dict().items(), compiled.state_dict().items()):
        torch.testing.assert_close(b, a, msg=n)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("sequence", [False, True], ids=["image", "sequence"])
def test_firing_report_counts_the_synaptic_operations_of_every_conv_and_the_classifier(net, sequence):
    """Every conv after the stem and the classifier perform, per unit of input, as many SOPs as
    their fan-out: measured at their inputs, they must equal the report's total for ADD and MS
    (exact wiring) and bound it from below for IAND/AND (the report credits an upper bound)."""
    torch.manual_seed(0)
    model = NETS[net]().train()  # batch statistics: the net fires
    set_firing_recording(model, True)
    reset_firing_counts(model)
    measured = []

    def measure(conv, args):
        measured.append(float(args[0].sum()) * synapses_per_neuron(conv, tuple(args[0].shape[1:])))

    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m is not model.conv1):
        conv.register_forward_pre_hook(measure)
    x = torch.randn(4, 3, 2, 8, 8) * 2 if sequence else torch.randn(3, 2, 8, 8) * 2
    with torch.no_grad():
        features = model.forward_features(x)
    measured.append(float(features.sum()) * model.num_classes)  # avgpool-FC: out_features per spike

    counts = firing_counts(model)
    lifs = {n for n, m in model.named_modules() if isinstance(m, LIF)}
    assert set(counts) == lifs == set(model.spike_consumers())
    assert all(counts[n][0] > 0 for n in lifs), "a neuron layer never fired"
    report = firing_report(counts, model, images=3)
    sops = report["sops_per_image"] * 3
    assert sops > 0 and report["energy_uj_per_image"] > 0
    if net in ("sew-IAND", "sew-AND"):
        assert sops >= sum(measured) > 0
    else:
        assert sops == pytest.approx(sum(measured), rel=1e-9)
    macs = (4 if sequence else 1) * conv_macs(model.conv1, (2, 8, 8))
    assert model.first_layer_macs_per_image() == macs
    assert report["energy_uj_per_image"] == pytest.approx((4.6 * macs + 0.9 * sops / 3) * 1e-6)


def test_sew_add_sums_spikes_along_the_shortcut_and_iand_and_stay_binary():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, 8) * 2
    for connect in ("ADD", "IAND", "AND"):
        torch.manual_seed(1)
        with torch.no_grad():
            features = _sew(connect).train().forward_features(x)
        values = set(features.unique().tolist())
        if connect == "ADD":  # the second stage's two blocks and its projection add up
            assert max(values) >= 2 and all(v == int(v) and 0 <= v <= 3 for v in values)
        else:  # AND thins the spikes out block after block (a * s <= a, s)
            assert values <= {0.0, 1.0} and features.sum() > 0
