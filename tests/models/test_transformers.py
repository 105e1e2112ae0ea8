"""The spiking transformers (Spikformer, Spike-driven Transformer v1 and v2 / Meta-SpikeFormer,
QKFormer): timm registration, parameter counts against the papers and their official code, the
papers' neuron, shapes and encodings, checkpointing modes, and firing accounting with the
attention's spike products."""

from pathlib import Path

import pytest
import timm
import torch

import models.zoo  # registers the spiking networks
from models import checkpointing
from models.firing import (conv_macs, firing_counts, firing_report, reset_firing_counts, set_firing_recording,
                           synapses_per_neuron)
from models.neurons import LIF, NeuronConfig
from models.qkformer import QKFormer
from models.spike_driven import FoldedConv, MetaSpikeFormer, SpikeDrivenTransformer
from models.spikformer import (CIFAR_POOLS, PAPER_NEURON, SpikeMatmul, SpikeSum, Spikformer,
                               SpikingTransformerArgumentError)

# (timm name, classes, the paper's count in millions, decimals the paper prints, source).
# The papers print counts to 0.01 M (0.1 M for v2) and do not round them one way: Spikformer's
# 16,816,024 is printed 16.81 and 36,005,416 36.01. So a count must lie within one unit of the
# last printed digit. Our modules leave out what the reference code builds and never calls
# (LayerNorms, a talking-heads conv); counted, those would still print the same.
PAPER_COUNTS = [
    # Spikformer, ICLR 2023, Tables 1 and 3 (ZK-Zhou/spikformer imagenet/model.py, cifar10/model.py)
    ("spikformer_8_384", 1000, 16.81, 2, "spikformer imagenet/model.py"),
    ("spikformer_8_512", 1000, 29.68, 2, "spikformer imagenet/model.py"),
    ("spikformer_10_512", 1000, 36.01, 2, "spikformer imagenet/model.py"),
    ("spikformer_8_768", 1000, 66.34, 2, "spikformer imagenet/model.py"),
    ("spikformer_cifar_4_256", 10, 4.15, 2, "spikformer cifar10/model.py"),
    ("spikformer_cifar_2_384", 10, 5.76, 2, "spikformer cifar10/model.py"),
    ("spikformer_cifar_4_384", 10, 9.32, 2, "spikformer cifar10/model.py"),
    # Spike-driven Transformer, NeurIPS 2023, Tables 1-2 (BICLab/Spike-Driven-Transformer
    # model/spikeformer.py, module/ms_conv.py, conf/imagenet/*.yml, conf/cifar10/2_512_300E_t4.yml);
    # its CIFAR count is the CIFAR-100 model's (100 classes: 10.28 M; 10 classes: 10.23 M).
    ("spike_driven_8_384", 1000, 16.81, 2, "Spike-Driven-Transformer model/spikeformer.py"),
    ("spike_driven_6_512", 1000, 23.37, 2, "Spike-Driven-Transformer model/spikeformer.py"),
    ("spike_driven_8_512", 1000, 29.68, 2, "Spike-Driven-Transformer model/spikeformer.py"),
    ("spike_driven_10_512", 1000, 36.01, 2, "Spike-Driven-Transformer model/spikeformer.py"),
    ("spike_driven_8_768", 1000, 66.34, 2, "Spike-Driven-Transformer model/spikeformer.py"),
    ("spike_driven_cifar_2_512", 100, 10.28, 2, "Spike-Driven-Transformer conf/cifar100/2_512_300E_t4.yml"),
    # Meta-SpikeFormer, ICLR 2024, Table 2 (BICLab/Spike-Driven-Transformer-V2
    # classification/models.py: metaspikformer_8_384, metaspikformer_8_512; the 15.1 M model
    # has no factory there, our widths 64-128-256-360 give it)
    ("meta_spikeformer_8_256", 1000, 15.1, 1, "Spike-Driven-Transformer-V2 (widths ours)"),
    ("meta_spikeformer_8_384", 1000, 31.3, 1, "Spike-Driven-Transformer-V2 classification/models.py"),
    ("meta_spikeformer_8_512", 1000, 55.4, 1, "Spike-Driven-Transformer-V2 classification/models.py"),
    # QKFormer, NeurIPS 2024, Table 1 and README (zhouchenlin2096/QKFormer imagenet/qkformer.py,
    # cifar10/model.py; imagenet/logs/QKFormer_{16M,29M,64M}.txt print "number of params (M)"
    # 16.47, 29.08, 64.96); its CIFAR count is the CIFAR-100 model's (10 classes: 6.71 M).
    ("qkformer_10_384", 1000, 16.47, 2, "QKFormer imagenet/logs/QKFormer_16M.txt"),
    ("qkformer_10_512", 1000, 29.08, 2, "QKFormer imagenet/logs/QKFormer_29M.txt"),
    ("qkformer_10_768", 1000, 64.96, 2, "QKFormer imagenet/logs/QKFormer_64M.txt"),
    ("qkformer_cifar_4_384", 100, 6.74, 2, "QKFormer cifar100/model.py"),
]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(name: str, **kwargs) -> torch.nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return timm.create_model(name, **kwargs)


# Ours, with no paper count: the count its docstring states.
OUR_COUNTS = {"meta_spikeformer_cifar_8_256": 14_754_818}


def test_every_transformer_is_registered_with_timm_and_has_a_paper_count_or_is_ours():
    families = ("models.spikformer", "models.spike_driven", "models.qkformer")
    names = {n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__ in families}
    assert names == {row[0] for row in PAPER_COUNTS} | set(OUR_COUNTS)
    for name, count in OUR_COUNTS.items():
        assert _params(_build(name)) == count


@pytest.mark.parametrize("name, classes, paper, decimals, source", PAPER_COUNTS, ids=[r[0] for r in PAPER_COUNTS])
def test_parameter_count_is_the_papers(name, classes, paper, decimals, source):
    n = _params(_build(name, num_classes=classes))
    assert abs(n / 1e6 - paper) < 10.0 ** -decimals, f"{name}: {n:,} parameters, {paper} M in {source}"


def test_qkformer_768_has_the_exact_count_of_the_official_training_log():
    # QKFormer imagenet/imagenet_origin_log.txt: "n_parameters": 64962760 at every epoch.
    assert _params(_build("qkformer_10_768")) == 64_962_760


def test_the_papers_neuron_is_spikingjellys_multistep_lif_tau_2():
    """PAPER_NEURON in our LIF is SpikingJelly's LIFNode(tau=2, detach_reset=True, sigmoid
    alpha=4) with the membrane scaled by tau: the same spikes and the same input gradients."""
    sj = pytest.importorskip("spikingjelly.activation_based.neuron")
    from spikingjelly.activation_based import surrogate

    torch.manual_seed(0)
    x = (torch.randn(6, 3, 4, 5, 5, dtype=torch.float64) * 1.5).requires_grad_()
    reference = sj.LIFNode(tau=2.0, detach_reset=True, surrogate_function=surrogate.Sigmoid(alpha=4.0),
                           step_mode="m")
    ours = LIF(4, PAPER_NEURON)
    spikes_ref, spikes = reference(x), ours(x)
    assert torch.equal(spikes, spikes_ref) and 0 < spikes.mean() < 1
    weights = torch.randn_like(spikes)
    (grad_ref,) = torch.autograd.grad((spikes_ref * weights).sum(), x)
    (grad,) = torch.autograd.grad((spikes * weights).sum(), x)
    torch.testing.assert_close(grad, grad_ref)


def test_factories_take_T_num_classes_in_chans_neuron_and_refuse_the_rest():
    model = timm.create_model("spikformer_cifar_2_384", T=2, num_classes=7, in_chans=1,
                              neuron=dict(tau_decay=0.25, v_threshold=1.0))
    assert (model.T, model.num_classes, model.stem.conv.in_channels, model.head.out_features) == (2, 7, 1, 7)
    lifs = {n: m for n, m in model.named_modules() if isinstance(m, LIF)}
    assert all(m.neuron.tau_decay == 0.25 for m in lifs.values())
    # the attention map's neuron has half the threshold of the others, as the papers' 0.5 vs 1
    assert {n for n, m in lifs.items() if m.neuron.v_threshold == 0.5} == {"blocks.0.attn.attn_lif",
                                                                              "blocks.1.attn.attn_lif"}
    assert all(m.neuron == PAPER_NEURON or m.neuron.v_threshold == 1.0
               for m in _build("qkformer_cifar_4_384").modules() if isinstance(m, LIF))
    with pytest.raises(SpikingTransformerArgumentError, match="nueron"):
        timm.create_model("spike_driven_cifar_2_512", nueron={})
    with pytest.raises(SpikingTransformerArgumentError, match="pretrained"):
        timm.create_model("qkformer_cifar_4_384", pretrained=True)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[T, B, C, H, W\]"):
        model(torch.randn(8, 8))


def _tiny(family: str, **kwargs):
    """Each family at a few thousand parameters on 2-channel 8x8 inputs (32x32 for v2, which
    downsamples by 16), T = 3, 5 classes."""
    args = dict(T=3, num_classes=5, in_chans=2, **kwargs)
    if family == "spikformer":
        return Spikformer(2, 16, 2, pools=CIFAR_POOLS, **args)
    if family == "spike_driven":
        return SpikeDrivenTransformer(2, 16, pools=CIFAR_POOLS, **args)
    if family == "meta":
        return MetaSpikeFormer((8, 16, 16, 16), heads=2, depths=(1, 1), **args)
    return QKFormer((1, 1, 1), 16, 2, imagenet=False, **args)


FAMILIES = ["spikformer", "spike_driven", "meta", "qkformer"]
SIZE = {"spikformer": 8, "spike_driven": 8, "meta": 32, "qkformer": 8}


def _randomise_running_stats(model) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_shapes_and_encodings(family):
    torch.manual_seed(0)
    model = _tiny(family).eval()
    _randomise_running_stats(model)
    size = SIZE[family]
    image, sequence = torch.randn(4, 2, size, size) * 2, torch.randn(2, 4, 2, size, size) * 2
    with torch.no_grad():
        per_step = model.forward_steps(image)
        assert per_step.shape == (3, 4, 5)
        torch.testing.assert_close(model(image), per_step.mean(0))
        # direct encoding (the stem once, broadcast over T) is the image repeated at every step
        repeated = model.forward_steps(image.unsqueeze(0).expand(3, -1, -1, -1, -1))
        torch.testing.assert_close(per_step, repeated, rtol=1e-5, atol=1e-5)
        assert model.forward_steps(sequence).shape == (2, 4, 5)  # a sequence runs its own T
    assert model.forward_features(image).shape[:3] == (3, 4, model.num_features)


def _step(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["blocks", "blocks+time"])
def test_checkpointing_across_time_gives_the_gradients_stats_and_counts_of_none(family, mode, monkeypatch):
    packed, real = [], checkpointing.pack_spikes
    monkeypatch.setattr(checkpointing, "pack_spikes", lambda t: packed.append(t) or real(t))
    size = SIZE[family]
    torch.manual_seed(0)
    x, y = torch.randn(4, 2, size, size) * 2, torch.tensor([0, 1, 2, 3])
    runs = []
    for m in ("none", mode):
        torch.manual_seed(1)
        model = _tiny(family).train()
        model.set_checkpointing(m, time_chunk=2)
        set_firing_recording(model, True)
        runs.append((model, _step(model, x, y)))
    (plain, g_plain), (ckpt, g_ckpt) = runs
    assert ckpt.checkpointing == mode and len(ckpt.checkpointed_parts()) > 2
    assert g_plain.keys() == g_ckpt.keys() and any(g.abs().sum() > 0 for g in g_plain.values())
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-5, atol=1e-7, msg=n)
    for (n, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), n  # BatchNorm statistics updated once, not again in the recomputation
    counts_plain, counts_ckpt = firing_counts(plain), firing_counts(ckpt)
    assert all(torch.equal(counts_plain[k], counts_ckpt[k]) for k in counts_plain)
    assert not packed  # residual streams carry sums of spikes or currents: nothing is bit-packed


def _spike_operand_hooks(model, measured, skip):
    """On every layer after the stem that spikes feed: the SOPs of its actual input by the
    counting rule (conv fan-out; ``head_dim`` per spike of a product's first operand; 1 per
    spike summed)."""
    def conv_hook(layer, args):
        measured.append(float(args[0].sum()) * synapses_per_neuron(layer, tuple(args[0].shape[-3:])))

    def product_hook(layer, args):
        measured.append(float(args[0].sum()) * layer.synapses_per_neuron(()))

    folded = [m for m in model.modules() if isinstance(m, FoldedConv)]
    inside_folded = {c for f in folded for c in f.modules() if isinstance(c, torch.nn.Conv2d)}
    for m in model.modules():
        if isinstance(m, (SpikeMatmul, SpikeSum)):
            m.register_forward_pre_hook(product_hook)
        elif isinstance(m, FoldedConv) or (isinstance(m, torch.nn.Conv2d) and m not in inside_folded | skip):
            m.register_forward_pre_hook(conv_hook)


@pytest.mark.parametrize("family", FAMILIES)
def test_firing_report_counts_the_attention_spike_products_and_every_layer(family):
    """The report's SOPs equal the SOPs measured at every layer's input by the counting rule of
    ``models.spikformer`` (exact where each layer reads a neuron layer's spikes or their sum;
    an upper bound where it reads a mask of them: SDSA's and QKFormer's ``Q * kv``, ``A * K``),
    and the attention's products are part of them."""
    torch.manual_seed(0)
    model = _tiny(family).train()  # batch statistics: the net fires
    set_firing_recording(model, True)
    reset_firing_counts(model)
    measured = []
    _spike_operand_hooks(model, measured, skip={model.stem.conv})
    head_inputs = []
    model.head.register_forward_pre_hook(lambda m, args: head_inputs.append(args[0]))
    size = SIZE[family]
    with torch.no_grad():
        features = model.forward_features(torch.randn(3, 2, size, size) * 2)
        model.forward_head(features)
    if family in ("spikformer", "qkformer"):  # the head reads the sums of spikes, averaged over tokens
        measured.append(float(features.sum()) * model.num_classes)
    else:  # the head reads head_lif's spikes
        measured.append(float(head_inputs[0].sum()) * model.num_classes)

    counts = firing_counts(model)
    consumers = model.spike_consumers()
    lifs = {n for n, m in model.named_modules() if isinstance(m, LIF)}
    assert set(counts) == lifs == set(consumers)
    products = {n for n, m in model.named_modules() if isinstance(m, (SpikeMatmul, SpikeSum))}
    assert products and products <= {c for cs in consumers.values() for c in cs}
    report = firing_report(counts, model, images=3)
    sops = report["sops_per_image"] * 3
    if family in ("spikformer", "meta"):
        assert sops == pytest.approx(sum(measured), rel=1e-9)
    else:
        assert sops >= sum(measured) > 0
    # the products' share: each credited spike times its fan-out
    product_sops = sum(float(counts[lif][0]) * model.get_submodule(c).synapses_per_neuron(())
                       for lif, cs in consumers.items() for c in cs if c in products)
    assert product_sops > 0
    without = dict(consumers)
    for lif in without:
        without[lif] = [c for c in without[lif] if c not in products]
    model.spike_consumers = lambda: without
    assert report["sops_per_image"] * 3 - firing_report(counts, model, images=3)["sops_per_image"] * 3 \
        == pytest.approx(product_sops)
    assert model.first_layer_macs_per_image() == conv_macs(model.stem.conv, (2, size, size))


def test_spikformer_attention_is_the_reference_formula():
    """SSA's output is LIF(BN(conv(LIF_{V_th/2}(Q K^T V * 0.125)))), Q K^T V in the CIFAR code's
    order ((Q K^T) V) and per head."""
    torch.manual_seed(0)
    attn = _tiny("spikformer").blocks[0].attn.train()
    seen = {}
    for name in ("q_lif", "k_lif", "v_lif"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    attn.attn_lif.register_forward_pre_hook(lambda m, a: seen.__setitem__("attn_in", a[0]))
    x = (torch.rand(3, 2, 16, 4, 4) > 0.6).float()
    attn(x)
    q, k, v = (seen[n].reshape(3, 2, 2, 8, 16).transpose(-1, -2) for n in ("q_lif", "k_lif", "v_lif"))
    expected = ((q @ k.transpose(-2, -1)) @ v * 0.125).transpose(-1, -2).reshape(3, 2, 16, 4, 4)
    torch.testing.assert_close(seen["attn_in"], expected)
    assert seen["attn_in"].abs().sum() > 0


def test_spike_driven_attention_is_a_mask_and_a_column_sum_per_channel():
    torch.manual_seed(0)
    attn = _tiny("spike_driven").blocks[0].attn.train()
    seen = {}
    for name in ("q_lif", "k_lif", "v_lif", "kv_lif"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
    attn.proj.conv.register_forward_pre_hook(lambda m, a: seen.__setitem__("proj_in", a[0]))
    attn.kv_lif.register_forward_pre_hook(lambda m, a: seen.__setitem__("kv_in", a[0]))
    attn(torch.randn(3, 2, 16, 4, 4) * 2)
    torch.testing.assert_close(seen["kv_in"], (seen["k_lif"] * seen["v_lif"]).sum((-2, -1), keepdim=True))
    assert torch.equal(seen["proj_in"], (seen["q_lif"] * seen["kv_lif"]).flatten(0, 1))
    assert set(seen["proj_in"].unique().tolist()) <= {0.0, 1.0}


def test_the_meta_spikeformer_repconv_folds_into_one_3x3_convolution():
    """RepConv in eval mode (conv1x1-BN padded with its zero response-dwconv3x3-pwconv-BN-BN) is
    a 3x3 convolution with zero padding: what its SOP fan-out assumes."""
    torch.manual_seed(0)
    rep = _tiny("meta").stage3[1].attn.q.eval()
    _randomise_running_stats(rep)
    x = (torch.rand(1, 2, 16, 5, 5) > 0.5).float()
    with torch.no_grad():
        out = rep(x)
        # the response to each one-hot input is the folded 3x3 kernel (plus a bias at zero input)
        bias = rep(torch.zeros(1, 1, 16, 5, 5))[0, 0, :, 2, 2]
        kernel = torch.zeros(16, 16, 3, 3)
        for c in range(16):
            probe = torch.zeros(1, 1, 16, 5, 5)
            probe[0, 0, c, 2, 2] = 1
            kernel[:, c] = (rep(probe)[0, 0, :, 1:4, 1:4] - bias[:, None, None]).flip(-1, -2)
        folded = torch.nn.functional.conv2d(x.flatten(0, 1), kernel, bias, padding=1)
    torch.testing.assert_close(out.flatten(0, 1), folded, rtol=1e-4, atol=1e-5)
    assert rep.synapses_per_neuron((16, 5, 5)) == synapses_per_neuron(
        torch.nn.Conv2d(16, 16, 3, padding=1), (16, 5, 5))


def test_factory_neuron_default_is_the_papers_and_a_config_neuron_replaces_it():
    assert all(m.neuron == PAPER_NEURON for m in _build("spikformer_cifar_2_384").modules()
               if isinstance(m, LIF) and m.neuron.v_threshold == PAPER_NEURON.v_threshold)
    ours = NeuronConfig(tau_decay=0.25, v_threshold=0.5)
    lifs = [m for m in _build("meta_spikeformer_8_256", neuron=ours).modules() if isinstance(m, LIF)]
    assert {m.neuron.v_threshold for m in lifs} == {0.5, 0.25} and all(m.neuron.tau_decay == 0.25 for m in lifs)


@pytest.mark.parametrize("family", ["spikformer", "spike_driven", "meta_spikeformer", "qkformer"])
def test_shipped_configs_use_the_papers_neuron_and_model(family):
    """configs/imagenet_<family>.yaml and cifar10_<family>.yaml: the neuron their headers call the
    papers' is PAPER_NEURON, and the models are the family's (tests/train/test_shipped_configs.py
    trains them)."""
    from train.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    for config in (f"imagenet_{family}.yaml", f"cifar10_{family}.yaml"):
        cfg = load_config(root / config)
        assert cfg.model.neuron == PAPER_NEURON, config
        entry = timm.models.model_entrypoint(cfg.model.name)
        assert entry.__module__ == {"spikformer": "models.spikformer", "qkformer": "models.qkformer"}.get(
            family, "models.spike_driven"), config
        assert cfg.optim.name == "adamw" and cfg.optim.label_smoothing == 0.1, config
